"""Tensor-parallel groups stay inside a node: a layout whose tp group would span nodes is
refused in plain words before any process group exists, unless forced."""

import pytest

from megadual.config import load_config
from megadual.config.errors import ConfigError
from megadual.config.schema import ParallelConfig
from megadual.distributed.topology import Layout, check_tp_placement, node_of
from megadual.train.loop import start_run

DEBUG_LM = "configs/debug/lm.yaml"


@pytest.mark.parametrize("tp, pp, per_node", [(2, 1, 2), (2, 2, 4), (4, 1, 8), (1, 4, 2)])
def test_valid_layouts_keep_every_tp_group_on_one_node(tp, pp, per_node):
    world = 8
    check_tp_placement(ParallelConfig(tp=tp, pp=pp, zero_stage=1), world, per_node)
    for group in Layout(tp=tp, pp=pp, dp=world // (tp * pp)).tp_groups():
        assert len({node_of(rank, per_node) for rank in group}) == 1, group


def test_a_tp_group_across_nodes_is_refused_unless_forced():
    with pytest.raises(ConfigError, match=r"parallel.tp: got 4, expected a divisor of the 2 ranks per node"):
        check_tp_placement(ParallelConfig(tp=4), world_size=8, ranks_per_node=2)
    check_tp_placement(ParallelConfig(tp=4, allow_cross_node_tp=True), world_size=8, ranks_per_node=2)
    check_tp_placement(ParallelConfig(tp=4), world_size=4, ranks_per_node=4)  # one node: nothing to span


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])  # torchrun's, the deepspeed launcher's
def test_start_run_refuses_before_any_process_group(variable, monkeypatch, tmp_path):
    import torch.distributed as dist

    for name, value in {"WORLD_SIZE": "6", variable: "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    cfg = load_config([DEBUG_LM], ["parallel.tp=2", f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="parallel.tp: got 2, expected a divisor of the 3 ranks per node"):
        start_run(cfg)
    assert not dist.is_initialized()
