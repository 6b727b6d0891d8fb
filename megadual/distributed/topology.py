"""tp x pp x dp process groups, in DeepSpeed's rank order, and the `mpu` adapter it accepts.

Rank order is that of DeepSpeed's `PipeModelDataParallelTopology`: axes (pipe, data, model)
with the model (tensor-parallel) axis innermost, so tensor-parallel peers are neighbouring
ranks (one node's fast links) and a pipeline engine built by DeepSpeed agrees with ours:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

`plan_layout` checks the degrees against the world size and the model without touching
any process group, so a bad layout fails before the first collective; `check_tp_placement`
checks that every tensor-parallel group sits inside one node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megadual.config.errors import ConfigError
from megadual.config.schema import BackboneConfig, ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Degrees of each kind of parallelism; tp * pp * dp == world_size."""

    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return rank // (self.tp * self.dp), dp_rank, tp_rank

    def rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]


def plan_layout(parallel: ParallelConfig, backbone: Optional[BackboneConfig], world_size: int) -> Layout:
    """Validate the degrees and derive dp = world_size / (tp * pp).

    Raises:
        ConfigError: the world size is not a multiple of tp * pp, or the model cannot be
            split as asked (heads, kv heads, MLP width or vocabulary not divisible by tp;
            fewer layers than pipeline stages; ZeRO-2/3 with a pipeline).
    """
    tp, pp = parallel.tp, parallel.pp
    if world_size % (tp * pp):
        raise ConfigError(
            "parallel.tp",
            tp,
            f"tp * pp ({tp} * {pp} = {tp * pp}) to divide the world size {world_size}; "
            f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp",
        )
    parallel.validate("parallel")
    if backbone is not None:
        for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(backbone, name) % tp:
                raise ConfigError(
                    f"backbone.{name}", getattr(backbone, name), f"a multiple of parallel.tp={tp}, or a smaller parallel.tp"
                )
        if pp > backbone.num_layers:
            raise ConfigError("parallel.pp", pp, f"at most backbone.num_layers={backbone.num_layers}")
    return Layout(tp=tp, pp=pp, dp=world_size // (tp * pp))


def check_tp_placement(parallel: ParallelConfig, world_size: int, ranks_per_node: int) -> None:
    """Refuse tensor-parallel groups that would span nodes (unless parallel.allow_cross_node_tp).

    Launchers number ranks node by node (rank = node * ranks_per_node + local rank) and a tp
    group is a run of tp consecutive ranks, so every group is node-local exactly when tp
    divides the ranks per node.
    """
    tp = parallel.tp
    if ranks_per_node >= world_size or ranks_per_node % tp == 0 or parallel.allow_cross_node_tp:
        return
    raise ConfigError(
        "parallel.tp", tp,
        f"a divisor of the {ranks_per_node} ranks per node, so that tensor-parallel peers (they exchange "
        "activations in every layer) share a node; launch more ranks per node, lower parallel.tp, or set "
        "parallel.allow_cross_node_tp=true to run it anyway",
    )


def node_of(rank: int, ranks_per_node: int) -> int:
    """The node a launcher puts `rank` on."""
    return rank // ranks_per_node


class Topology:
    """This rank's coordinates and its tensor-, data- and pipeline-parallel groups.

    Build it after `torch.distributed` is initialised; every rank must build it (group
    creation is collective and happens in the same order everywhere).
    """

    def __init__(self, layout: Layout):
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout {layout} needs {layout.world_size} processes, got {dist.get_world_size()}")
        self.layout = layout
        self.rank = dist.get_rank()
        self.pp_rank, self.dp_rank, self.tp_rank = layout.coords(self.rank)
        self.tp_group = self._my_group(layout.tp_groups())
        self.dp_group = self._my_group(layout.dp_groups())
        self.pp_group = self._my_group(layout.pp_groups())

    def _my_group(self, all_groups: list[list[int]]) -> dist.ProcessGroup:
        mine = None
        for ranks in all_groups:
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if self.rank in ranks:
                mine = group
        assert mine is not None
        return mine

    def mpu(self) -> "MPU":
        return MPU(self)


class MPU:
    """The Megatron-style `mpu` interface DeepSpeed reads (model parallel = tensor parallel)."""

    def __init__(self, topology: Topology):
        self._t = topology

    def get_model_parallel_rank(self) -> int:
        return self._t.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._t.layout.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._t.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._t.layout.rank(self._t.pp_rank, self._t.dp_rank, 0)

    def get_data_parallel_rank(self) -> int:
        return self._t.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._t.layout.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._t.dp_group

    def get_pipe_parallel_rank(self) -> int:
        return self._t.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self._t.layout.pp

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return self._t.pp_group
