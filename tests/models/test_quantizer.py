"""ResidualQuantizer: straight-through, commitment loss, usage, EMA state, restarts, data parallelism.

Shapes: B batch, T positions, D codebook dim, K codes, R depth.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

import megadual.ops as ops
from megadual.models.vision import ResidualQuantizer
from tests._dist import run_distributed

D, K, R = 8, 32, 3
# 0.75 and 0.25 are exact in binary, so EMA counts of integer assignments stay exact and
# "count < 1" decides the same way on every code path (fused, split + all-reduce, reference).
DECAY = 0.75


def _batches(num, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, D, generator=g) * 2 for _ in range(num)]


def _make(shared=True, dp_group=None, seed=5):
    torch.manual_seed(0)  # the codebook init: identical on every rank and process
    return ResidualQuantizer(D, K, R, shared_codebook=shared, decay=DECAY, dp_group=dp_group, seed=seed)


def _buffers(q):
    return {name: buf.clone() for name, buf in q.named_buffers()}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_forward_outputs_gradients_and_losses(shared):
    q = _make(shared).eval()
    x = torch.randn(2, 5, D, requires_grad=True)  # [B, T, D]
    out = q(x)
    assert out.quantized.shape == (2, 5, D) and out.codes.shape == (2, 5, R)
    enc = ops.rq_encode(x.detach().reshape(-1, D), q.codebook, R, return_cumulative=True)
    assert torch.equal(out.codes.reshape(-1, R), enc.codes)
    # The forward value is exactly the codes' sum.
    assert torch.equal(out.quantized.detach().reshape(-1, D), enc.quantized)
    # Commitment: mean over depths of MSE(x, cumulative after depth r).
    flat = x.detach().reshape(-1, D)
    want = torch.stack([((flat - enc.cumulative[r]) ** 2).mean() for r in range(R)]).mean()
    torch.testing.assert_close(out.commitment_loss, want)
    # Straight-through: d quantized / d x is the identity; the commitment gradient pulls x to its codes.
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward(retain_graph=True)
    assert torch.equal(x.grad, g)
    x.grad = None
    out.commitment_loss.backward()
    want_grad = 2 * (flat.unsqueeze(0) - enc.cumulative).sum(0) / (R * flat.numel())
    torch.testing.assert_close(x.grad.reshape(-1, D), want_grad)
    # Usage statistics.
    usage = out.usage
    counts_shape = (K,) if shared else (R, K)
    assert usage.counts.shape == counts_shape
    assert usage.counts.sum().item() == 10 * R
    assert torch.equal(usage.fraction_used, (usage.counts > 0).float().mean(-1))
    assert ((usage.perplexity >= 1) & (usage.perplexity <= K)).all()


def test_usage_perplexity_values():
    q = _make().eval()
    # Every row exactly a distinct code, later depths then pick the code nearest 0.
    x = q.codebook[:4].clone()
    usage = q(x).usage
    assert usage.counts[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    p = usage.counts / usage.counts.sum()
    want = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(usage.perplexity, want)


def test_eval_leaves_state_alone_and_training_updates_it():
    q = _make().eval()
    before = _buffers(q)
    q(_batches(1, 40)[0])
    assert all(torch.equal(before[k], v) for k, v in q.named_buffers())
    q.train()
    q(_batches(1, 40)[0])
    assert not torch.equal(before["codebook"], q.codebook)
    assert set(q.state_dict()) >= {"codebook", "cluster_size", "embed_sum", "_extra_state"}


def test_dead_codes_are_restarted_from_batch_residuals():
    q = _make()
    x = _batches(1, 6)[0]  # 6 rows x 3 depths = 18 assignments for 32 codes: many die
    q.train()(x)
    restarted = (q.cluster_size == 1.0).nonzero()[:, 0]
    assert restarted.numel() > 0
    assert (q.cluster_size >= 1.0).all()
    # Each restarted code is the residual some depth quantized.
    enc = ops.rq_encode(x, _make().codebook, R, return_cumulative=True)
    prev = torch.cat([torch.zeros(1, *x.shape), enc.cumulative[:-1]])
    pool = (x.unsqueeze(0) - prev).reshape(-1, D)
    assert ((q.codebook[restarted, None] - pool[None]).abs().amax(-1) == 0).any(-1).all()


def test_state_dict_round_trip_resumes_exactly():
    batches = _batches(4, 20)
    a = _make().train()
    for x in batches[:2]:
        a(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = _make(seed=99).train()  # different restart seed: the state dict must override it
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for x in batches[2:]:
        out_a, out_b = a(x), b(x)
        assert torch.equal(out_a.codes, out_b.codes)
    for (name, va), vb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(va, vb), name


@pytest.mark.skipif(not ops.extension_available(), reason="megadual._C is not built")
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_extension_and_reference_paths_agree(shared, monkeypatch):
    batches = _batches(3, 30)
    fast = _make(shared).train()
    for x in batches:
        fast(x)
    monkeypatch.setattr(ops, "_extension_loaded", False)
    slow = _make(shared).train()
    for x in batches:
        slow(x)
    for (name, va), vb in zip(fast.named_buffers(), slow.buffers()):
        # EMA sums accumulate in a different order: fp32 noise only.
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments():
    with pytest.raises(ValueError, match="codebook_size must be a positive integer, got 0"):
        ResidualQuantizer(D, 0, R)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        ResidualQuantizer(D, K, R, decay=1.5)
    with pytest.raises(ValueError, match="last dim must be the codebook dim 8"):
        _make()(torch.randn(4, D + 1))


# --------------------------------------------------------------------------- data parallel

ROWS_PER_RANK = 12
STEPS = 3


def _dp_body(rank, world_size, shared):
    # A data-parallel group distinct from the world group object, as the trainer builds it.
    group = dist.new_group(list(range(world_size)))
    q = _make(shared, dp_group=group).train()
    restarted = 0
    for full in _batches(STEPS, ROWS_PER_RANK * world_size, seed=1):
        q(full[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK])
        restarted += int((q.cluster_size == 1.0).sum())
    return _buffers(q), restarted


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_two_ranks_keep_identical_codebooks_equal_to_one_process(shared):
    (state0, restarted0), (state1, restarted1) = run_distributed(_dp_body, world_size=2, args=(shared,))
    assert restarted0 > 0  # restarts did happen, so the broadcast path was exercised
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    single = _make(shared).train()
    for full in _batches(STEPS, ROWS_PER_RANK * 2, seed=1):
        single(full)
    for name, value in single.named_buffers():
        # All-reduced partial sums vs one sequential sum: fp32 summation order only.
        torch.testing.assert_close(state0[name], value, rtol=1e-5, atol=1e-5, msg=name)
