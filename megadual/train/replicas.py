"""Data-parallel replicas that must agree, checked cheaply every `replica_check_every` steps.

Every data-parallel rank holds the same buffers (EMA codebooks and their counts), the same
parameters below ZeRO-3 (ZeRO-3 partitions them, so they are left out there) and the same
step. A rank whose copy drifts (a missed all-reduce, a restart decided on one rank only, a
bit flip) trains on silently; vector-quantize-pytorch users report exactly that for codebooks.

The check fingerprints each tensor by its bits (int64 sum of the raw words, each weighted by
its position mod a prime, so a permutation changes it too) and runs one all-reduce of
[fingerprints, -fingerprints] with MAX over the data-parallel group: where max != -(-min)
the replicas differ. Only then does an all-gather name the ranks that differ from their
group's first rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

_WEIGHT_PERIOD = 251  # position weights 1..251: a prime, so shifted data changes the sum


class ReplicaDriftError(RuntimeError):
    """Data-parallel replicas hold different copies of state that must be identical."""


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point or flat.dtype.is_complex:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        flat = flat.view(width)
    return flat.to(torch.int64)


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """An int64 scalar that equal tensors share and any change of a value or its place alters."""
    bits = _bits(tensor)
    weights = torch.arange(bits.numel(), device=bits.device) % _WEIGHT_PERIOD + 1
    return (bits * weights).sum()


def replicated_state(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The tensors every data-parallel replica must hold identically."""
    state = {f"buffer {name}": b for name, b in module.named_buffers()}
    if zero_stage < 3:
        state.update({f"parameter {name}": p for name, p in module.named_parameters()})
    return state


def check_replicas(module: nn.Module, zero_stage: int, step: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise ReplicaDriftError naming the tensors and ranks that differ (a collective: every
    data-parallel rank calls it at the same step).

    Args:
        group: the data-parallel group (None: the world).
    """
    if dist.get_world_size(group) == 1:
        return
    state = replicated_state(module, zero_stage)
    names = ["the training step", *state]
    device = next(iter(state.values())).device if state else torch.device("cpu")
    prints = torch.stack([torch.tensor(step, dtype=torch.int64, device=device),
                          *(fingerprint(t).to(device) for t in state.values())])
    extremes = torch.cat([prints, -prints])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    n = prints.numel()
    differ = (extremes[:n] != -extremes[n:]).nonzero().flatten().tolist()
    if not differ:
        return
    gathered = [torch.empty_like(prints) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, prints, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(gathered)))
    details = []
    for i in differ[:5]:
        odd = [ranks[r] for r, g in enumerate(gathered) if g[i] != gathered[0][i]]
        details.append(f"{names[i]} (rank(s) {', '.join(map(str, odd))} differ from rank {ranks[0]})")
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise ReplicaDriftError(f"data-parallel replicas disagree at step {step}: {'; '.join(details)}{more}; "
                            "the run stops rather than train diverged copies (resume from the last checkpoint)")
