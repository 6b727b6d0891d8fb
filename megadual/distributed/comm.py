"""Differentiable collectives over a tensor-parallel group (Megatron's f, g and friends).

Legend: ... any leading dims, D full last dim, D/p one rank's slice, p the group size.

Each op is an autograd function whose backward is the collective's adjoint. A group of
size 1 (or None) makes every op the identity, so tp=1 code runs with no communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]


def group_size(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group_size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[-1] % size:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the input gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: all-reduce (sum). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather along it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromGroup(torch.autograd.Function):
    """Forward: all-gather slices along the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Enter a parallel region: replicated input [...] whose gradient is summed over the group."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a parallel region: sum partial results [...] over the group."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[..., D] -> [..., D/p], this rank's slice."""
    return x if group_size(group) == 1 else _ScatterToGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[..., D/p] -> [..., D], the slices of all ranks in rank order."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, group)
