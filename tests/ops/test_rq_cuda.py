"""CUDA kernels of megadual.ops against the reference (run on a GPU machine; skipped without CUDA).

Shapes: N rows, D dim, K codes, R depth.

Codes must be identical; float outputs may differ from the eager reference only by
accumulation order: their error against a float64 oracle is at most twice the eager error.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megadual.ops import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("megadual._C") is None, reason="megadual._C is not built"),
]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _load_extension():
    import megadual.ops

    assert megadual.ops.extension_available()


def _data(n, d, k, depth, shared, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    shape = (k, d) if shared else (depth, k, d)
    cb = torch.randn(shape, generator=g)
    if not shared:
        cb = cb * torch.logspace(0, -1, depth).view(depth, 1, 1)
    return x.to(dtype).cuda(), cb.to(dtype).cuda()


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
@pytest.mark.parametrize("tiles", [(0, 0), (100, 300)], ids=["default_tiles", "small_tiles"])
def test_cuda_encode_equals_reference(dtype, shared, tiles):
    n, d, k, depth = 1000, 32, 700, 4
    x, cb = _data(n, d, k, depth, shared, dtype)
    codes, q, cum = torch.ops.megadual.rq_encode(x, cb, depth, True, None, *tiles)
    rcodes, rq, rcum = ref.rq_encode(x, cb, depth, True)  # eager, same device and dtype
    assert torch.equal(codes, rcodes)
    # Float64 oracle for the same codes: the exact sum of the chosen codes.
    cbs = cb.double() if not shared else cb.double().expand(depth, -1, -1)
    exact_cum = torch.stack([cbs[r][codes[:, r]] for r in range(depth)]).cumsum(0)  # [R, N, D]
    for got, eager in ((q, rq), (cum, rcum)):
        truth = exact_cum[-1] if got.dim() == 2 else exact_cum
        kernel_err = (got.double() - truth).abs().max().item()
        eager_err = (eager.double() - truth).abs().max().item()
        assert kernel_err <= 2 * max(eager_err, torch.finfo(dtype).eps), (kernel_err, eager_err)


def test_cuda_ties_go_to_lowest_index():
    k, d = 100, 8
    cb = torch.randn(k, d) * 3 + 10
    target = torch.randn(d)
    for i in (77, 40, 3):
        cb[i] = target
    x = target.repeat(5, 1)
    for tile_k in (0, 37):
        codes = torch.ops.megadual.rq_encode(x.cuda(), cb.cuda(), 1, False, None, 0, tile_k)[0]
        assert codes.flatten().tolist() == [3] * 5


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_cuda_ema_update_equals_reference(shared):
    n, d, k, depth = 2000, 16, 300, 3
    x, cb = _data(n, d, k, depth, shared, torch.float32, seed=4)
    codes = ref.rq_encode(x, cb, depth)[0]
    counts, sums = torch.ops.megadual.rq_code_stats(x, cb, codes)
    rcounts, rsums = ref.rq_code_stats(x, cb, codes)
    assert torch.equal(counts, rcounts)
    # fp32 atomics: the order of the additions varies.
    torch.testing.assert_close(sums, rsums, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    cluster = (torch.rand(cb.shape[:-1], generator=g) * 4).cuda()
    states = [(cluster.clone(), cb * cluster.unsqueeze(-1), cb.clone()) for _ in range(2)]
    torch.ops.megadual.ema_update_(*states[0], x, codes, 0.9, 1e-5)
    ref.ema_update_(*states[1], x, codes, 0.9, 1e-5)
    for a, b in zip(*states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_dead_code_restart_equals_reference():
    k, d = 64, 8
    cb = torch.randn(k, d, device="cuda")
    cluster = torch.rand(k, device="cuda") * 2
    samples = torch.randn(500, d, device="cuda")
    states = [(cluster.clone(), cb * cluster[:, None], cb.clone()) for _ in range(2)]
    got = torch.ops.megadual.dead_code_restart_(*states[0], samples, 1.0, torch.Generator("cuda").manual_seed(3))
    want = ref.dead_code_restart_(*states[1], samples, 1.0, torch.Generator("cuda").manual_seed(3))
    assert got.numel() > 0 and torch.equal(got, want)
    for a, b in zip(*states):
        assert torch.equal(a, b)


def test_cuda_opcheck():
    """Schemas, register_fake and autograd registration agree with the CUDA kernels."""
    x, cb = _data(70, 8, 40, 3, shared=True, dtype=torch.float32)
    _, cbs = _data(70, 8, 40, 3, shared=False, dtype=torch.float32)
    for args in [(x, cb, 3, True, None, 16, 17), (x, cbs, 3, False, torch.int32, 0, 0),
                 (x.bfloat16(), cb, 2, True, None, 0, 0)]:
        torch.library.opcheck(torch.ops.megadual.rq_encode.default, args)
    codes = ref.rq_encode(x, cb, 3)[0]
    torch.library.opcheck(torch.ops.megadual.rq_code_stats.default, (x, cb, codes))
    state = (torch.rand(40, device="cuda") + 0.5, cb.clone(), cb.clone())
    torch.library.opcheck(torch.ops.megadual.ema_update_.default, (*state, x, codes, 0.99, 1e-5))
    counts, sums = ref.rq_code_stats(x, cb, codes)
    torch.library.opcheck(torch.ops.megadual.ema_apply_.default, (*state, counts, sums, 0.99, 1e-5))
