"""Which dimension of each parameter tensor parallelism splits, and merging / splitting by it.

The answer comes from the module types, so any model built from the tensor-parallel layers
(the backbone today, the unified model's vocabulary-sized parts later) needs no table:
column-parallel weights and biases and vocab-parallel embeddings split dim 0, row-parallel
weights dim 1; every other parameter is replicated on all tensor-parallel ranks.
"""

from __future__ import annotations

from typing import Optional

import torch

from megadual.distributed.tensor_parallel import partition_dims

__all__ = ["StateDict", "merge_tensor_parallel", "partition_dims", "split_tensor_parallel"]

StateDict = dict[str, torch.Tensor]


def merge_tensor_parallel(shards: list[StateDict], dims: dict[str, Optional[int]]) -> StateDict:
    """Full tensors from the per-rank state dicts of one tensor-parallel group (rank order).

    Raises:
        ValueError: a rank lacks a tensor, or replicated copies differ.
    """
    names = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != names:
            raise ValueError(f"tensor-parallel rank {rank} holds {sorted(set(shard) ^ names)[:5]} unlike rank 0")
    full: StateDict = {}
    for name in shards[0]:
        dim = dims.get(name)
        if dim is None:
            if any(not torch.equal(shards[0][name], s[name]) for s in shards[1:]):
                raise ValueError(f"replicated tensor {name!r} differs between tensor-parallel ranks")
            full[name] = shards[0][name]
        else:
            full[name] = torch.cat([s[name] for s in shards], dim=dim)
    return full


def split_tensor_parallel(full: StateDict, dims: dict[str, Optional[int]], tp: int) -> list[StateDict]:
    """Per-rank state dicts for `tp` tensor-parallel ranks (views into `full`)."""
    shards: list[StateDict] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        dim = dims.get(name)
        if dim is not None and tensor.shape[dim] % tp:
            raise ValueError(f"{name!r} has {tensor.shape[dim]} entries along dim {dim}, not divisible by tp={tp}")
        parts = tensor.chunk(tp, dim=dim) if dim is not None else [tensor] * tp
        for rank in range(tp):
            shards[rank][name] = parts[rank].contiguous() if dim is not None else parts[rank]
    return shards
