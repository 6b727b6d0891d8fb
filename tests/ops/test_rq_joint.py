"""megadual.ops.rq_joint_encode (TokenFlow's shared-index residual search): the compiled CPU
kernel equals the reference bit for bit on both search paths, and both equal a brute-force
float64 joint argmin away from float ties.

Shapes: N rows, Ds / Dp semantic / pixel dims, K codes, R depth.
"""

from __future__ import annotations

import pytest
import torch

import megadual.ops as ops
from megadual.ops import reference as ref

from .test_rq_ops import HAS_EXT, needs_ext


@pytest.fixture(scope="module", autouse=True)
def _load_extension():
    if HAS_EXT:
        assert ops.extension_available()


def _pair(n, ds, dp, k, depth, shared, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_sem, x_pix = torch.randn(n, ds, generator=g), torch.randn(n, dp, generator=g)
    shape = (k,) if shared else (depth, k)
    scale = 1.0 if shared else torch.logspace(0, -1, depth).view(depth, 1, 1)  # later depths: smaller residuals
    cb_sem = torch.randn(*shape, ds, generator=g) * scale
    cb_pix = torch.randn(*shape, dp, generator=g) * scale
    return x_sem.to(dtype), x_pix.to(dtype), cb_sem.to(dtype), cb_pix.to(dtype)


def _ext(*args):
    return torch.ops.megadual.rq_joint_encode(*args)


# Ds + Dp = 16 and 64 take the fused search's unrolled loops, 40 its run-time loop, 300 the GEMM tiles.
SHAPES = [(8, 8), (32, 8), (48, 16), (200, 100)]


@needs_ext
@pytest.mark.parametrize("kernel", ["auto", "gemm"])
@pytest.mark.parametrize("ds,dp", SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_kernel_equals_reference_bit_for_bit(monkeypatch, kernel, ds, dp, shared):
    monkeypatch.setenv("MEGADUAL_RQ_CPU_KERNEL", kernel)
    for weight in (1.0, 0.35, 2.5):
        args = (*_pair(301, ds, dp, 300, 4, shared), 4, weight, True, None)
        got, want = _ext(*args), ref.rq_joint_encode(*args)
        for name, g, w in zip(("codes", "q_sem", "q_pix", "cum_sem", "cum_pix"), got, want):
            assert torch.equal(g, w), f"{name} differs (w={weight}, {kernel})"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_search_in_float32_like_the_reference(dtype):
    args = (*_pair(100, 16, 8, 64, 3, True, dtype), 3, 1.0, False, torch.int32)
    got, want = _ext(*args), ref.rq_joint_encode(*args)
    assert got[0].dtype == torch.int32 and got[1].dtype == dtype
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_depth"])
def test_codes_are_the_brute_force_joint_argmin(shared):
    """Depth by depth, the chosen code minimises d_sem + w d_pix computed in float64 from the
    residuals the chosen codes leave; where another code is as near (a float32 tie), the
    difference is within float32 rounding."""
    x_sem, x_pix, cb_sem, cb_pix = _pair(400, 24, 8, 128, 3, shared)
    w = 0.7
    codes = ops.rq_joint_encode(x_sem, x_pix, cb_sem, cb_pix, 3, w).codes
    res_sem, res_pix = x_sem.double(), x_pix.double()
    exact = 0
    for r in range(3):
        es = (cb_sem if shared else cb_sem[r]).double()
        ep = (cb_pix if shared else cb_pix[r]).double()
        dist = torch.cdist(res_sem, es).pow(2) + w * torch.cdist(res_pix, ep).pow(2)  # [N, K] float64
        chosen = dist.gather(1, codes[:, r : r + 1]).squeeze(1)
        best = dist.min(dim=1)
        assert torch.all(chosen - best.values <= 1e-4 * best.values.abs().clamp_min(1.0))
        exact += int((codes[:, r] == best.indices).sum())
        res_sem = res_sem - es[codes[:, r]]
        res_pix = res_pix - ep[codes[:, r]]
    assert exact >= 0.99 * 400 * 3  # ties are rare: almost every code is the float64 argmin itself


def test_weight_zero_is_the_semantic_search_alone_and_ties_go_to_the_lowest_code():
    x_sem, x_pix, cb_sem, cb_pix = _pair(200, 16, 8, 64, 3, True)
    joint = ops.rq_joint_encode(x_sem, x_pix, cb_sem, cb_pix, 3, 0.0)
    assert torch.equal(joint.codes, ops.rq_encode(x_sem, cb_sem, 3).codes)
    assert torch.equal(joint.quantized_sem, ops.rq_encode(x_sem, cb_sem, 3).quantized)
    # Pixel codes follow the shared index, whatever they are.
    assert torch.equal(joint.quantized_pix, cb_pix[joint.codes].sum(1))
    doubled = ops.rq_joint_encode(x_sem, x_pix, torch.cat([cb_sem, cb_sem]), torch.cat([cb_pix, cb_pix]), 3, 1.0)
    assert int(doubled.codes.max()) < 64  # every code has a twin 64 later: the lower one wins


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: (a[0], a[1][:-1], *a[2:]), "x_sem has 50 rows but x_pix has 49"),
        (lambda a: (*a[:3], a[3][:-1]), "K=32 codes and the pixel codebook K=31"),
        (lambda a: (a[0], a[1].to(torch.bfloat16), *a[2:]), "cast both to one dtype"),
        (lambda a: (*a[:3], a[3][None].expand(2, -1, -1).contiguous()), "both be shared by all depths or both"),
    ],
)
def test_pairs_that_do_not_match_are_refused_by_name(change, message):
    args = change(_pair(50, 8, 4, 32, 2, True))
    with pytest.raises(ValueError, match=message):
        ops.rq_joint_encode(*args, 2)
    with pytest.raises(ValueError, match="pixel_weight must be >= 0, got -1"):
        ops.rq_joint_encode(*_pair(50, 8, 4, 32, 2, True), 2, -1.0)


@needs_ext
def test_opcheck():
    pair = _pair(70, 8, 4, 40, 3, True)
    per_depth = _pair(70, 8, 4, 40, 3, False)
    for args in [(*pair, 3, 1.0, True, None), (*per_depth, 3, 0.5, False, torch.int32)]:
        torch.library.opcheck(torch.ops.megadual.rq_joint_encode.default, args)
