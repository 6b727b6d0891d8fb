"""megadual.ops: residual quantization and EMA codebook ops, compiled vs reference vs vector-quantize-pytorch.

Shapes: N rows, D dim, K codes, R depth, S restart samples.

The reference is the oracle. Compiled-vs-reference tests skip (with the reason) when the
extension is not built; reference-vs-vector-quantize-pytorch tests always run.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import warnings

import pytest
import torch

import megadual.ops as ops
from megadual.ops import reference as ref


def _extension_built() -> bool:
    return importlib.util.find_spec("megadual._C") is not None


HAS_EXT = _extension_built()
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason="megadual._C is not built (pip install --no-build-isolation -e .)"
)
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _load_extension():
    # Loads megadual._C and its fake kernels when built, so torch.ops.megadual exists below.
    if HAS_EXT:
        assert ops.extension_available()


def ext_encode(x, cb, depth, return_cumulative=False, codes_dtype=None, tile_n=0, tile_k=0):
    return torch.ops.megadual.rq_encode(x, cb, depth, return_cumulative, codes_dtype, tile_n, tile_k)


def _data(n, d, k, depth, shared, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    shape = (k, d) if shared else (depth, k, d)
    # Later depths quantize smaller residuals: scale their codebooks down so every depth
    # actually picks among its codes (a realistic search, not always the smallest code).
    cb = torch.randn(shape, generator=g)
    if not shared:
        cb = cb * torch.logspace(0, -1, depth).view(depth, 1, 1)
    return x, cb.to(dtype)


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_reference_matches_vector_quantize_pytorch(shared):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    n, d, k, depth = 512, 16, 96, 4
    x, cb = _data(n, d, k, depth, shared)
    rvq = vqp.ResidualVQ(dim=d, num_quantizers=depth, codebook_size=k, shared_codebook=shared, kmeans_init=False).eval()
    with torch.no_grad():
        for r, layer in enumerate(rvq.layers):
            layer._codebook.embed.copy_((cb if shared else cb[r])[None])
        theirs_q, theirs_codes, _ = rvq(x[None])
    for codes, quantized in (ref.rq_encode(x, cb, depth)[:2], ops.rq_encode(x, cb, depth)[:2]):
        # vq-pytorch computes distances with cdist (a sqrt of the same quadratic form): same
        # argmin except at float32 near-ties, which random data of this size does not hit.
        assert torch.equal(codes, theirs_codes[0])
        # Sums of the same codes in the same order; vq-pytorch's straight-through adds and
        # subtracts x, which costs a few ulps.
        torch.testing.assert_close(quantized, theirs_q[0], rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
@pytest.mark.parametrize("tiles", [(0, 0), (7, 33), (64, 1000)], ids=["default_tiles", "odd_tiles", "big_tiles"])
def test_extension_encode_equals_reference(dtype, shared, tiles):
    n, d, k, depth = 300, 24, 200, 3
    x, cb = _data(n, d, k, depth, shared, dtype)
    codes, q, cum = ext_encode(x, cb, depth, True, None, *tiles)
    rcodes, rq, rcum = ref.rq_encode(x, cb, depth, True)
    # Same fp32 arithmetic in the same order (norms, -2 x.e, residual updates): exact.
    assert torch.equal(codes, rcodes)
    assert q.dtype == dtype and cum.dtype == dtype
    assert torch.equal(q, rq)
    assert torch.equal(cum, rcum)
    assert cum.shape == (depth, n, d)
    # The running sum ends at the returned quantized output.
    assert torch.equal(cum[-1], q)


@needs_ext
def test_extension_encode_options():
    x, cb = _data(64, 8, 40, 5, shared=True)
    codes, q, cum = ext_encode(x, cb, 5, False, torch.int32)
    assert codes.dtype == torch.int32 and codes.shape == (64, 5)
    assert cum.numel() == 0
    assert torch.equal(codes.long(), ref.rq_encode(x, cb, 5)[0])
    out = ops.rq_encode(x, cb, 5, codes_dtype=torch.int32)
    assert out.cumulative is None and out.codes.dtype == torch.int32


@pytest.mark.parametrize("path", ["extension", "reference"])
def test_ties_go_to_lowest_index(path):
    if path == "extension" and not HAS_EXT:
        pytest.skip("megadual._C is not built")
    k, d = 100, 8
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(k, d, generator=g) * 3 + 10  # far from x: only the copies below can win
    target = torch.randn(d, generator=g)
    for i in (77, 40, 3):  # three exact copies, in different lanes and tiles
        cb[i] = target
    x = target.repeat(5, 1)
    for tile_k in (0, 37):
        codes = ext_encode(x, cb, 1, tile_k=tile_k)[0] if path == "extension" else ref.rq_encode(x, cb, 1)[0]
        assert codes.flatten().tolist() == [3] * 5


# The CPU search has a fused register-blocked kernel (AVX-512 or AVX2+FMA, D <= 256) and a
# GEMM-tiled one; MEGADUAL_RQ_CPU_KERNEL forces one. "avx2" runs on any AVX-512 machine too.
CPU_KERNELS = ["auto", "avx512", "avx2", "gemm"]
ODD_SHAPES = [(1, 1, 1), (13, 5, 7), (301, 33, 517), (129, 64, 1000), (70, 100, 45), (37, 256, 70), (20, 300, 40)]


@needs_ext
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "N{}_D{}_K{}".format(*s))
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda t: str(t).split(".")[-1])
def test_cpu_kernels_equal_reference_on_odd_shapes(kernel, shape, dtype, monkeypatch):
    monkeypatch.setenv("MEGADUAL_RQ_CPU_KERNEL", kernel)
    n, d, k = shape
    for shared, tiles in ((True, (0, 0)), (False, (5, 33))):
        x, cb = _data(n, d, k, 3, shared, dtype, seed=n + d + k)
        codes, q, cum = ext_encode(x, cb, 3, True, None, *tiles)
        rcodes, rq, rcum = ref.rq_encode(x, cb, 3, True)
        assert torch.equal(codes, rcodes)
        assert torch.equal(q, rq) and torch.equal(cum, rcum)


def _near_tie_data(n, d, k, seed=0):
    """Codes in pairs one ulp apart (one component nudged) and rows right next to them:
    which of a pair wins is decided by the last bit of fp32 rounding, so only the same
    arithmetic in the same order gives the same codes (a mul-then-add order flips ~3% of rows)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k // 2, d, generator=g)
    nudged = base.clone()
    rows, comp = torch.arange(k // 2), torch.randint(d, (k // 2,), generator=g)
    direction = torch.where(torch.rand(k // 2, generator=g) < 0.5, -torch.inf, torch.inf)
    nudged[rows, comp] = torch.nextafter(base[rows, comp], direction)
    cb = torch.cat([base, nudged])[torch.randperm(2 * (k // 2), generator=g)]
    x = cb[torch.randint(cb.shape[0], (n,), generator=g)] + 1e-3 * torch.randn(n, d, generator=g)
    return x, cb


@needs_ext
@pytest.mark.skipif(
    not (torch.backends.mkl.is_available() and platform.machine() in ("x86_64", "AMD64")),
    reason="the pinned distance order (one fp32 fma per component, increasing d) is what MKL's sgemm computes",
)
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("d", [7, 32, 64])
def test_cpu_kernels_bit_identical_at_near_ties(kernel, d, monkeypatch):
    monkeypatch.setenv("MEGADUAL_RQ_CPU_KERNEL", kernel)
    x, cb = _near_tie_data(1500, d, 300, seed=d)
    want = ref.rq_encode(x, cb, 2)[0]
    # The GEMM path is only as exact as MKL's choice of kernel: tiny tiles (7 x 33) take a
    # small-matrix path that rounds differently (~0.5% of these rows). The fused kernel's
    # arithmetic does not depend on the tiling.
    for tiles in ((0, 0), (64, 1000)) if kernel == "gemm" else ((0, 0), (7, 33), (64, 1000)):
        assert torch.equal(ext_encode(x, cb, 2, False, None, *tiles)[0], want)


@needs_ext
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_cpu_kernels_ties_go_to_lowest_index(kernel, monkeypatch):
    monkeypatch.setenv("MEGADUAL_RQ_CPU_KERNEL", kernel)
    k, d = 700, 32
    g = torch.Generator().manual_seed(4)
    cb = torch.randn(k, d, generator=g) * 3 + 10
    target = torch.randn(d, generator=g)
    # Copies in different lanes, vectors, panels and cache blocks, listed high to low.
    for i in (690, 531, 77, 40, 17):
        cb[i] = target
    x = target.repeat(19, 1)
    for tile_k in (0, 37, 64):
        assert ext_encode(x, cb, 1, tile_k=tile_k)[0].flatten().tolist() == [17] * 19
    # Every code identical: code 0 everywhere, at every depth.
    same = target.repeat(k, 1)
    assert (ext_encode(torch.randn(9, d, generator=g), same, 3)[0] == 0).all()


@needs_ext
def test_cpu_kernel_env_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("MEGADUAL_RQ_CPU_KERNEL", "sse9")
    with pytest.raises(ValueError, match="MEGADUAL_RQ_CPU_KERNEL"):
        ext_encode(*_data(4, 8, 5, 1, shared=True), 1)


def test_greedy_residual_semantics():
    # Hand-checkable: 1-D codes {0, 10, 1}; x = 12 -> 10 (residual 2), then 1 (residual 1), then 1.
    x = torch.tensor([[12.0]])
    cb = torch.tensor([[0.0], [10.0], [1.0]])
    for codes, q, cum in (ref.rq_encode(x, cb, 3, True), ops.rq_encode(x, cb, 3, return_cumulative=True)):
        assert codes.tolist() == [[1, 2, 2]]
        assert q.item() == 12.0
        assert cum.flatten().tolist() == [10.0, 11.0, 12.0]


# --------------------------------------------------------------------------- EMA


def _ema_state(cb, seed=3):
    g = torch.Generator().manual_seed(seed)
    cluster = torch.rand(cb.shape[:-1], generator=g) * 4
    embed_sum = cb.float() * cluster.unsqueeze(-1)
    return cluster, embed_sum, cb.float().clone()


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
@pytest.mark.parametrize("residual_codes", [True, False], ids=["codes_NR", "codes_N"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_extension_ema_update_equals_reference(shared, residual_codes, dtype):
    n, d, k, depth = 400, 12, 50, 3
    if not residual_codes:
        depth, shared = 1, True
    x, cb = _data(n, d, k, depth, shared, seed=5)
    x = x.to(dtype)
    codes = ref.rq_encode(x, cb, depth)[0]
    if not residual_codes:
        codes = codes[:, 0]
    ext_state, ref_state = _ema_state(cb), _ema_state(cb)
    torch.ops.megadual.ema_update_(*ext_state, x, codes, 0.9, 1e-5)
    ref.ema_update_(*ref_state, x, codes, 0.9, 1e-5)
    # Same terms, summed in a different order (rows x depths vs depth by depth): fp32 noise.
    for got, want in zip(ext_state, ref_state):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # The update moved something: a test of a no-op would pass too.
    assert not torch.allclose(ext_state[2], cb.float())
    # Split form (what data parallelism uses) equals the fused one.
    counts, sums = torch.ops.megadual.rq_code_stats(x, cb.float(), codes)
    rcounts, rsums = ref.rq_code_stats(x, cb.float(), codes)
    assert torch.equal(counts, rcounts)  # integer counts: exact
    torch.testing.assert_close(sums, rsums, rtol=2e-5, atol=2e-5)
    split = _ema_state(cb)
    torch.ops.megadual.ema_apply_(*split, counts, sums, 0.9, 1e-5)
    for got, want in zip(split, ext_state):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_reference_ema_update_formula():
    # One code, two vectors: count 2, sum [4, 6]; decay 0.5 from count 2, sum [2, 2].
    cluster, embed_sum, cb = torch.tensor([2.0, 0.0]), torch.tensor([[2.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ops.ema_update_(cluster, embed_sum, cb, x, torch.tensor([0, 0]), 0.5, 1e-5)
    assert torch.allclose(cluster, torch.tensor([2.0, 0.0]))
    assert torch.allclose(embed_sum, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    n, eps = 2.0, 1e-5
    smoothed = (2.0 + eps) / (n + 2 * eps) * n
    torch.testing.assert_close(cb[0], torch.tensor([3.0, 4.0]) / smoothed)


def test_reference_ema_matches_vector_quantize_pytorch():
    # vq-pytorch's EuclideanCodebook in training mode: one EMA step with the same state.
    vqp = pytest.importorskip("vector_quantize_pytorch")
    n, d, k, decay, eps = 300, 8, 32, 0.8, 1e-5
    x, cb = _data(n, d, k, 1, shared=True, seed=11)
    vq = vqp.VectorQuantize(dim=d, codebook_size=k, decay=decay, eps=eps, kmeans_init=False).train()
    book = vq._codebook
    cluster, embed_sum, _ = _ema_state(cb)
    with torch.no_grad():
        book.embed.copy_(cb[None])
        book.cluster_size.copy_(cluster[None])
        book.embed_avg.copy_(embed_sum[None])
        vq(x[None])
    codes = ref.rq_encode(x, cb, 1)[0][:, 0]
    ref.ema_update_(cluster, embed_sum, cb, x, codes, decay, eps)
    torch.testing.assert_close(cluster, book.cluster_size[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embed_sum, book.embed_avg[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb, book.embed[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- restart


@needs_ext
@pytest.mark.parametrize("num_samples", [200, 3], ids=["distinct_rows", "with_replacement"])
def test_extension_dead_code_restart_equals_reference(num_samples):
    k, d = 60, 6
    _, cb = _data(1, d, k, 1, shared=True)
    samples = torch.randn(num_samples, d, generator=torch.Generator().manual_seed(2))
    ext_state, ref_state = _ema_state(cb), _ema_state(cb)
    dead_before = (ext_state[0] < 1.0).sum().item()
    assert dead_before > 3  # so both draw modes are exercised
    got = torch.ops.megadual.dead_code_restart_(*ext_state, samples, 1.0, torch.Generator().manual_seed(7))
    want = ref.dead_code_restart_(*ref_state, samples, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(got, want) and got.numel() == dead_before
    for a, b in zip(ext_state, ref_state):
        assert torch.equal(a, b)
    cluster, embed_sum, book = ext_state
    assert (cluster >= 1.0).all()
    # Every restarted code is one of the samples, and its EMA sum is consistent with it.
    assert ((book[got, None] - samples[None]) == 0).all(-1).any(-1).all()
    torch.testing.assert_close(embed_sum[got], book[got] * 1.0)
    if num_samples >= got.numel():
        assert len({tuple(r.tolist()) for r in book[got]}) == got.numel()  # distinct rows


def test_dead_code_restart_is_deterministic_and_noop_without_dead_codes():
    cb = torch.randn(10, 4)
    state = (torch.full((10,), 5.0), cb.clone(), cb.clone())
    assert ops.dead_code_restart_(*state, torch.randn(8, 4), 1.0).numel() == 0
    assert torch.equal(state[2], cb)
    a, b = _ema_state(cb, seed=1), _ema_state(cb, seed=1)
    s = torch.randn(30, 4)
    ops.dead_code_restart_(*a, s, 1.0, torch.Generator().manual_seed(3))
    ops.dead_code_restart_(*b, s, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a[2], b[2])


# --------------------------------------------------------------------------- opcheck


@needs_ext
def test_opcheck():
    x, cb = _data(70, 8, 40, 3, shared=True)
    _, cbs = _data(70, 8, 40, 3, shared=False)
    for args in [
        (x, cb, 3, True, None, 16, 17),
        (x, cbs, 3, False, torch.int32, 0, 0),
        (x.to(torch.bfloat16), cb, 2, True, None, 0, 0),
    ]:
        torch.library.opcheck(torch.ops.megadual.rq_encode.default, args)
    codes = ref.rq_encode(x, cb, 3)[0]
    torch.library.opcheck(torch.ops.megadual.rq_code_stats.default, (x, cb, codes))
    torch.library.opcheck(torch.ops.megadual.ema_update_.default, (*_ema_state(cb), x, codes, 0.99, 1e-5))
    counts, sums = ref.rq_code_stats(x, cb, codes)
    torch.library.opcheck(torch.ops.megadual.ema_apply_.default, (*_ema_state(cb), counts, sums, 0.99, 1e-5))
    torch.library.opcheck(
        torch.ops.megadual.dead_code_restart_.default, (*_ema_state(cb), x, 1.0, torch.Generator().manual_seed(0))
    )


# --------------------------------------------------------------------------- bad input

_X, _CB = torch.randn(6, 4), torch.randn(5, 4)
_CODES = torch.zeros(6, 2, dtype=torch.int64)


def _state():
    return torch.ones(5), _CB.clone(), _CB.clone()


BAD_ENCODE = {
    "wrong_dtype": ((_X.double(), _CB, 2), "dtype must be float32"),
    "int_input": ((_X.long(), _CB, 2), "dtype must be float32"),
    "non_contiguous": ((torch.randn(4, 6).t(), _CB, 2), "contiguous"),
    "mismatched_D": ((_X, torch.randn(5, 3), 2), "D=3 does not match x dim D=4"),
    "depth_zero": ((_X, _CB, 0), "depth R must be >= 1, got 0"),
    "empty_batch": ((_X[:0], _CB, 2), "empty batch"),
    "x_not_2d": ((_X[None], _CB, 2), "must be 2-D"),
    "wrong_num_codebooks": ((_X, torch.randn(3, 5, 4), 2), "got 3 per-depth codebooks for depth R=2"),
}

BAD_EMA = {
    "code_too_large": ((*_state(), _X, torch.full((6, 2), 5), 0.9, 1e-5), r"codes must lie in \[0, K=5\)"),
    "code_negative": ((*_state(), _X, torch.full((6,), -1), 0.9, 1e-5), "got min -1"),
    "codes_float": ((*_state(), _X, _CODES.float(), 0.9, 1e-5), "codes must be int64 or int32"),
    "codes_rows": ((*_state(), _X, _CODES[:3], 0.9, 1e-5), "codes has 3 rows but x has 6"),
    "empty_batch": ((*_state(), _X[:0], _CODES[:0], 0.9, 1e-5), "empty batch"),
    "decay_one": ((*_state(), _X, _CODES, 1.0, 1e-5), r"decay must be in \[0, 1\)"),
    "state_dtype": ((torch.ones(5), _CB.double(), _CB.clone(), _X, _CODES, 0.9, 1e-5), "must be float32"),
    "state_shape": ((torch.ones(4), _CB.clone(), _CB.clone(), _X, _CODES, 0.9, 1e-5), "cluster_size shape"),
}


@pytest.mark.parametrize("path", ["extension", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_ENCODE))
def test_bad_encode_input_raises_value_error(path, case):
    if path == "extension" and not HAS_EXT:
        pytest.skip("megadual._C is not built")
    args, match = BAD_ENCODE[case]
    fn = ext_encode if path == "extension" else ref.rq_encode
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("path", ["extension", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_EMA))
def test_bad_ema_input_raises_value_error(path, case):
    if path == "extension" and not HAS_EXT:
        pytest.skip("megadual._C is not built")
    args, match = BAD_EMA[case]
    fn = torch.ops.megadual.ema_update_ if path == "extension" else ref.ema_update_
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("path", ["extension", "reference"])
def test_bad_restart_input_raises_value_error(path):
    if path == "extension" and not HAS_EXT:
        pytest.skip("megadual._C is not built")
    fn = torch.ops.megadual.dead_code_restart_ if path == "extension" else ref.dead_code_restart_
    with pytest.raises(ValueError, match="empty batch"):
        fn(*_state(), _X[:0], 1.0, None)
    with pytest.raises(ValueError, match=r"samples must be \[S, D=4\]"):
        fn(*_state(), torch.randn(3, 2), 1.0, None)


# --------------------------------------------------------------------------- loading


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setenv("MEGADUAL_DISABLE_EXT", "1")
    monkeypatch.setattr(ops, "_extension_loaded", None)
    x, cb = _data(50, 8, 20, 2, shared=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.rq_encode(x, cb, 2)
        second = ops.rq_encode(x, cb, 2)
    messages = [str(w.message) for w in caught if "PyTorch reference" in str(w.message)]
    assert len(messages) == 1 and "MEGADUAL_DISABLE_EXT=1" in messages[0]
    assert torch.equal(first.codes, ref.rq_encode(x, cb, 2)[0]) and torch.equal(first.codes, second.codes)


def test_import_is_cheap():
    code = (
        "import sys, megadual, megadual.ops\n"
        "assert 'megadual._C' not in sys.modules, 'extension loaded at import'\n"
        "assert 'deepspeed' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
