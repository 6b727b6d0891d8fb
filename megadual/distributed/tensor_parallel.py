"""Megatron-style tensor-parallel layers; with a group of size 1 they are plain layers.

Legend: N tokens, I input features, O output features, V vocabulary, D hidden, p group size.

Weights are initialised as the full matrix from the global RNG and then sliced, so a
model built at tp=p with seed s holds exactly the shards of the tp=1 model built with
seed s (and tp peers never start with identical shards, which would never diverge).
Sharded parameters carry `tensor_model_parallel = True` (DeepSpeed counts them once per
tp rank in the gradient norm) and `partition_dim` (which dim is split, for converters).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .comm import ProcessGroup, copy_to_group, gather_from_group, group_rank, group_size, reduce_from_group


def _shard_size(full: int, group: ProcessGroup, what: str) -> int:
    size = group_size(group)
    if full % size:
        raise ValueError(f"{what}={full} is not divisible by the tensor-parallel size {size}")
    return full // size


def _init_shard(shape_full: tuple[int, int], dim: int, group: ProcessGroup, std: float, device=None) -> torch.Tensor:
    """Normal(0, std) full matrix from the global RNG, sliced along `dim` for this rank."""
    full = torch.empty(shape_full, device=device)
    if full.device.type != "meta":
        full.normal_(0.0, std)
    size = group_size(group)
    return full.chunk(size, dim=dim)[group_rank(group)].clone() if size > 1 else full


def _mark_sharded(param: nn.Parameter, dim: int, group: ProcessGroup) -> None:
    if group_size(group) > 1:
        param.tensor_model_parallel = True
        param.partition_dim = dim


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over the group: each rank computes O/p outputs.

    Args:
        gather_output: all-gather the outputs to [..., O]; otherwise return [..., O/p]
            (the usual case: a row-parallel layer or a vocab-parallel loss follows).
    Shapes: x [..., I] (replicated) -> [..., O/p] or [..., O].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: ProcessGroup = None,
                 init_std: float = 0.02, gather_output: bool = False, device=None):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        local_out = _shard_size(out_features, group, "output features")
        self.weight = nn.Parameter(_init_shard((out_features, in_features), 0, group, init_std, device))
        _mark_sharded(self.weight, 0, group)
        self.bias = nn.Parameter(torch.zeros(local_out, device=device)) if bias else None
        if self.bias is not None:
            _mark_sharded(self.bias, 0, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        return gather_from_group(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over the group; partial sums are all-reduced.

    Shapes: x [..., I/p] (this rank's slice, e.g. a column-parallel output) -> [..., O] replicated.
    The bias is replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: ProcessGroup = None,
                 init_std: float = 0.02, device=None):
        super().__init__()
        self.group = group
        _shard_size(in_features, group, "input features")
        self.weight = nn.Parameter(_init_shard((out_features, in_features), 1, group, init_std, device))
        _mark_sharded(self.weight, 1, group)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split into p contiguous ranges, one per rank.

    Each rank looks up the ids in its range, writes zeros elsewhere, and the all-reduce
    assembles the full embedding. Shapes: ids [B, T] -> [B, T, D] replicated.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: ProcessGroup = None,
                 init_std: float = 0.02, device=None):
        super().__init__()
        self.group = group
        local = _shard_size(num_embeddings, group, "vocab_size")
        self.vocab_start = group_rank(group) * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(_init_shard((num_embeddings, embedding_dim), 0, group, init_std, device))
        _mark_sharded(self.weight, 0, group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token NLL from vocab-sharded logits without gathering them.

    Forward: all-reduce (max) of the row maxima, all-reduce (sum) of the target logits and
    of the exp-sums. Backward: none; each rank's gradient is softmax - onehot on its shard.
    """

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab
        row_max = logits.max(dim=-1).values
        torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)

        ignored = target == ignore_index
        outside = (target < start) | (target >= start + local_vocab) | ignored
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        torch.distributed.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        torch.distributed.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax  # reused in place: the saved softmax is not needed again
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup = None, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token next-token NLL; 0 where `target == ignore_index`.

    Shapes: logits [..., V/p] (this rank's vocabulary range), target [...] full-vocab ids
    -> loss [...] in fp32, identical on every rank of the group.
    """
    if group_size(group) == 1:
        return F.cross_entropy(
            logits.flatten(0, -2).float(), target.flatten(), ignore_index=ignore_index, reduction="none"
        ).view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)


def gather_vocab_logits(logits: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """[..., V/p] -> [..., V]: full logits for sampling or inspection (not for the loss)."""
    return gather_from_group(logits, group)


def partition_dims(model: nn.Module) -> dict[str, Optional[int]]:
    """{state-dict name: split dim or None} for every tensor of `model` (build it on meta)."""
    dims: dict[str, Optional[int]] = {name: None for name in model.state_dict()}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, ColumnParallelLinear):
            dims[dot + "weight"] = 0
            if module.bias is not None:
                dims[dot + "bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[dot + "weight"] = 1
        elif isinstance(module, VocabParallelEmbedding):
            dims[dot + "weight"] = 0
    return dims
