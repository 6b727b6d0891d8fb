"""Optimizer steps with non-finite gradients are skipped, on every rank alike.

DeepSpeed's ZeRO optimizers skip a step whose gradients overflow (its "OVERFLOW! Skipping
step"), but without ZeRO a NaN loss (too high a learning rate, a bad batch) went straight into
the weights: the run saved NaN checkpoints, moved `latest` and exited 0. The guard wraps the
innermost torch optimizer's `step`, the one call every engine makes once per optimizer step
on every rank, each over its own partition: it checks that partition's gradients, agrees with
every other rank by an all-reduce, and when any rank saw inf or nan no rank updates its
weights or moments (the LR schedule still advances). `step_done` counts a step as skipped when
the guard or DeepSpeed's own check skipped it; the training loop stops a run after
`train.max_skipped_steps` of them in a row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class NonFiniteTrainingError(ValueError):
    """The run stopped because its gradients stayed non-finite (a ValueError, so the command
    line reports it in one line like the other bad-value stops)."""


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), or `optimizer` itself."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    return optimizer


def _flag_device() -> torch.device:
    """Where an all-reduced flag must live: NCCL reduces CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _true_on_every_rank(local: bool) -> bool:
    """`local` agreed over the world (an all-reduce of one flag): True only if True everywhere."""
    bad = torch.tensor([0.0 if local else 1.0], device=_flag_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _all_finite(tensors) -> bool:
    """One device sync for all the tensors, not one per tensor."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    """Installed on an engine's optimizer; `skipped_last`, `skipped_in_a_row` and `skipped`
    tell what happened to the steps so far."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.optimizer = innermost_optimizer(engine.optimizer)
        self._step = self.optimizer.step
        self.optimizer.step = self._guarded_step  # shadows the class's step for this instance
        self.skipped_last = False
        self.skipped = 0  # steps skipped so far in this process
        self.skipped_in_a_row = 0
        self._skipped_here = False
        self._engine_skips = self._engine_skip_count()

    def _engine_skip_count(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def step_done(self) -> None:
        """After each optimizer step: was it skipped, by the guard or by DeepSpeed?"""
        engine_skips = self._engine_skip_count()
        self.skipped_last = self._skipped_here or engine_skips > self._engine_skips
        self.skipped += self.skipped_last
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if self.skipped_last else 0
        self._skipped_here, self._engine_skips = False, engine_skips

    def _local_grads_finite(self) -> bool:
        return _all_finite(p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None)

    def _guarded_step(self, *args, **kwargs):
        self._skipped_here = not _true_on_every_rank(self._local_grads_finite())
        if not self._skipped_here:
            return self._step(*args, **kwargs)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        return None


def weights_finite_on_every_rank(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` holds only finite values on every rank (under ZeRO-3:
    each rank checks its partition). Collective."""
    return _true_on_every_rank(_all_finite(getattr(p, "ds_tensor", p) for p in module.parameters()))
