"""JointResidualQuantizer (TokenFlow's shared mapping): one index for a semantic and a pixel
codebook, EMA updates of the pair from one count, paired restarts, data parallelism.

Shapes: N rows, Ds / Dp codebook dims, K codes, R depth.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import megadual.ops as ops
from megadual.models.vision.joint_quantizer import JointResidualQuantizer
from megadual.ops import reference as ref
from tests._dist import run_distributed

DS, DP, K, R = 8, 4, 32, 3
DECAY = 0.75  # exact in binary: EMA counts of integer assignments stay exact on every path
ROWS_PER_RANK, STEPS = 6, 3  # few rows: codes go unused and are restarted


def _make(shared=True, dp_group=None, weight=1.0):
    return JointResidualQuantizer(DS, DP, K, R, pixel_weight=weight, shared_codebook=shared, decay=DECAY,
                                  dp_group=dp_group, seed=5)


def _batches(num, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, DS, generator=g) * 2, torch.randn(rows, DP, generator=g)) for _ in range(num)]


def _buffers(q):
    return {name: buf.clone() for name, buf in q.named_buffers()}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_one_index_selects_both_codes_with_straight_through_gradients(shared):
    q = _make(shared).eval()
    x_sem, x_pix = (t.requires_grad_() for t in _batches(1, 50)[0])
    out = q(x_sem, x_pix)
    want = ops.rq_joint_encode(x_sem.detach(), x_pix.detach(), q.codebook_sem, q.codebook_pix, R, 1.0,
                               return_cumulative=True)
    assert torch.equal(out.codes, want.codes)
    assert torch.equal(out.quantized_sem.detach(), want.quantized_sem)
    assert torch.equal(out.quantized_pix.detach(), want.quantized_pix)
    expected = torch.nn.functional.mse_loss(x_pix.detach().expand(R, -1, -1), want.cumulative_pix)
    torch.testing.assert_close(out.commitment_pix, expected)
    (out.quantized_sem.sum() + 2 * out.quantized_pix.sum()).backward()
    assert torch.equal(x_sem.grad, torch.ones_like(x_sem)) and torch.equal(x_pix.grad, torch.full_like(x_pix, 2.0))


def test_ema_moves_both_codebooks_by_the_shared_counts():
    q = _make().train()
    before = _buffers(q)
    x_sem, x_pix = _batches(1, 60)[0]
    q(x_sem, x_pix)
    codes = ops.rq_joint_encode(x_sem, x_pix, before["codebook_sem"], before["codebook_pix"], R).codes
    count = before["cluster_size"].clone()
    for part, x in (("sem", x_sem), ("pix", x_pix)):
        cs, es, cb = count.clone(), before[f"embed_sum_{part}"].clone(), before[f"codebook_{part}"].clone()
        ref.ema_apply_(cs, es, cb, *ref.rq_code_stats(x, cb, codes), DECAY, 1e-5)
        alive = cs >= 1.0  # dead codes were restarted afterwards
        torch.testing.assert_close(q.__getattr__(f"codebook_{part}")[alive], cb[alive])
        torch.testing.assert_close(q.cluster_size[alive], cs[alive])


def test_a_dead_code_restarts_in_both_codebooks_from_one_position():
    q = _make().train()
    before = _buffers(q)
    x_sem, x_pix = _batches(1, 30)[0]
    q(x_sem, x_pix)
    # The pool: every (depth, row) residual pair the search quantized, from the codebooks it used.
    enc = ops.rq_joint_encode(x_sem, x_pix, before["codebook_sem"], before["codebook_pix"], R, return_cumulative=True)
    ema_count = DECAY * before["cluster_size"] + (1 - DECAY) * torch.bincount(enc.codes.flatten(), minlength=K)
    restarted = (ema_count < 1.0).nonzero()[:, 0]
    assert restarted.numel() > 0 and torch.all(q.cluster_size[restarted] == 1.0)
    pools = []
    for x, cumulative in ((x_sem, enc.cumulative_sem), (x_pix, enc.cumulative_pix)):
        previous = torch.cat([torch.zeros_like(cumulative[:1]), cumulative[:-1]])
        pools.append((x.unsqueeze(0) - previous).reshape(-1, x.shape[1]))  # [R * N, D]
    for k in restarted.tolist():
        sem_rows = set((pools[0] == q.codebook_sem[k]).all(1).nonzero()[:, 0].tolist())
        pix_rows = set((pools[1] == q.codebook_pix[k]).all(1).nonzero()[:, 0].tolist())
        assert sem_rows & pix_rows, f"code {k}: its semantic and pixel vectors come from different positions"


def _dp_body(rank, world_size, shared):
    group = dist.new_group(list(range(world_size)))
    q = _make(shared, dp_group=group).train()
    restarted = 0
    for x_sem, x_pix in _batches(STEPS, ROWS_PER_RANK * world_size, seed=1):
        part = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        q(x_sem[part], x_pix[part])
        restarted += int((q.cluster_size == 1.0).sum())
    return _buffers(q), restarted


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_two_ranks_keep_the_pair_identical_and_equal_to_one_process(shared):
    (state0, restarted0), (state1, _) = run_distributed(_dp_body, world_size=2, args=(shared,))
    assert restarted0 > 0  # the paired broadcast restart ran
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    single = _make(shared).train()
    for x_sem, x_pix in _batches(STEPS, ROWS_PER_RANK * 2, seed=1):
        single(x_sem, x_pix)
    for name, value in single.named_buffers():
        # All-reduced partial sums vs one sequential sum: fp32 summation order only.
        torch.testing.assert_close(state0[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_state_dict_carries_the_restart_generator():
    a = _make().train()
    batches = _batches(4, 30, seed=2)
    for x in batches[:2]:
        a(*x)
    b = _make().train()
    b.load_state_dict(a.state_dict())
    for x in batches[2:]:
        a(*x)
        b(*x)
    for (name, va), vb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(va, vb), name


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pixel_weight must be >= 0, got -0.5"):
        _make(weight=-0.5)
    with pytest.raises(ValueError, match=r"expected \[..., 8\] and \[..., 4\] over the same positions"):
        _make()(torch.zeros(3, DS), torch.zeros(2, DP))
