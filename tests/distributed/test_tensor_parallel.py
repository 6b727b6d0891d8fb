"""Tensor parallelism on 2 gloo ranks against a single-process model built in the same test.

Tolerances: the sharded model computes the same fp32 sums split in two halves and added by
an all-reduce, so results differ from the unsharded ones only by summation order:
~1e-7 relative on O(1) values. 1e-5 relative on the loss (the issue's bar) and 1e-5 / 1e-6
absolute on logits / gradients leave a factor ~10-100 of headroom over that rounding and
still catch any misplaced shard, which is O(1e-2) off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadual.config.errors import ConfigError
from megadual.config.schema import BackboneConfig, ParallelConfig
from megadual.distributed.tensor_parallel import gather_vocab_logits, vocab_parallel_cross_entropy
from megadual.distributed.topology import Layout, Topology, plan_layout
from megadual.models.qwen2 import build_qwen2
from tests._dist import run_distributed

CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_rank_order_matches_deepspeed():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layout = Layout(tp=2, pp=2, dp=3)
    ds = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    for rank in range(layout.world_size):
        coord = ds.get_coord(rank)
        assert layout.coords(rank) == (coord.pipe, coord.data, coord.model)
    assert sorted(map(sorted, layout.tp_groups())) == sorted(map(sorted, ds.get_axis_comm_lists("model")))
    assert sorted(map(sorted, layout.dp_groups())) == sorted(map(sorted, ds.get_axis_comm_lists("data")))
    assert sorted(map(sorted, layout.pp_groups())) == sorted(map(sorted, ds.get_axis_comm_lists("pipe")))


@pytest.mark.parametrize(
    "parallel,world,backbone,match",
    [
        (dict(tp=2, pp=1), 3, {}, "divide the world size 3"),
        (dict(tp=1, pp=2, zero_stage=3), 2, {}, "parallel.zero_stage"),
        (dict(tp=2), 2, dict(num_kv_heads=1), "backbone.num_kv_heads"),
        (dict(tp=4), 4, dict(num_heads=6, num_kv_heads=2), "backbone.num_heads"),
        (dict(pp=4, zero_stage=1), 4, {}, "parallel.pp"),
        (dict(pp=2, zero_stage=0), 2, {}, "ZeRO-0 pipeline"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(parallel, world, backbone, match):
    with pytest.raises(ConfigError, match=match):
        plan_layout(ParallelConfig(**parallel), BackboneConfig(**{**CFG, **backbone}), world)
    assert not torch.distributed.is_initialized()


def _tp_body(rank, world_size, tied):
    cfg = BackboneConfig(**CFG, tie_embeddings=tied)
    topo = Topology(Layout(tp=2, pp=1, dp=1))
    reference = build_qwen2(cfg, seed=0)
    sharded = build_qwen2(cfg, seed=0, tp_group=topo.tp_group)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    labels[0, :3] = -100
    positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    cu = torch.tensor([0, 5, 12, 17, 24])

    ref_logits = reference(ids, positions, cu)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()

    shard_logits = sharded(ids, positions, cu)
    assert shard_logits.shape[-1] == cfg.vocab_size // 2
    token_loss = vocab_parallel_cross_entropy(shard_logits, labels, topo.tp_group)
    loss = token_loss.sum() / (labels != -100).sum()
    loss.backward()

    torch.testing.assert_close(gather_vocab_logits(shard_logits, topo.tp_group), ref_logits, atol=1e-5, rtol=0)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())

    ref_params = dict(reference.named_parameters())
    for name, p in sharded.named_parameters():
        want = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            want = want.chunk(2, dim=p.partition_dim)[rank]
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return loss.item()


@pytest.mark.parametrize("tied", [False, True])
def test_tp2_logits_loss_and_gradients_equal_single_process(tied):
    losses = run_distributed(_tp_body, world_size=2, args=(tied,))
    assert losses[0] == losses[1]


def _vocab_ce_body(rank, world_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    target = torch.randint(0, 16, (10,), generator=g)
    target[[2, 7]] = -100
    weights = torch.rand(10, generator=g)
    want = F.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    (want * weights).sum().backward()
    shard = logits.detach().chunk(2, dim=-1)[rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(shard, target, torch.distributed.group.WORLD)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(shard.grad, logits.grad.chunk(2, dim=-1)[rank], atol=1e-6, rtol=0)


def test_vocab_parallel_cross_entropy_matches_torch():
    run_distributed(_vocab_ce_body, world_size=2)
