"""Readable PyTorch reference of every megadual op: the fallback and the test oracle.

Shapes: N rows, D dim, K codes, R depth, C codebooks (1 when shared by all depths, else R),
S restart samples, M dead codes.

The compiled kernels (kernels/csrc) must agree with these functions: codes exactly, floats to
the last bits where the arithmetic is the same (greedy search, restarts) and within fp32
summation-order noise where it is not (the EMA sums). Everything is computed in float32
whatever the input dtype; outputs that mirror x come back in x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Rows per distance block: bounds the reference's scratch (ROW_BLOCK x K fp32) like the
# kernels' tiles, so the fallback can run the DualToken shape without an N x K matrix.
ROW_BLOCK = 1024


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_rq_encode_args(x, codebooks, depth, codes_dtype=None) -> int:
    """Validate rq_encode's arguments like the C++ op does; returns C (1 = shared codebook)."""
    if x.dim() != 2:
        raise ValueError(
            f"rq_encode: x must be 2-D [N, D], got shape {_shape(x)}; "
            "flatten leading dims with x.reshape(-1, x.shape[-1])"
        )
    if x.dtype not in _FLOATS:
        raise ValueError(
            f"rq_encode: x dtype must be float32, bfloat16 or float16, got {x.dtype}; cast it with x.float()"
        )
    if codebooks.dtype not in _FLOATS:
        raise ValueError(
            f"rq_encode: codebook dtype must be float32, bfloat16 or float16, got {codebooks.dtype}; "
            "cast it with codebook.float()"
        )
    if not x.is_contiguous():
        raise ValueError(f"rq_encode: x must be contiguous (strides {list(x.stride())}); call x.contiguous()")
    if not codebooks.is_contiguous():
        raise ValueError("rq_encode: codebook must be contiguous; call codebook.contiguous()")
    if depth < 1:
        raise ValueError(f"rq_encode: depth R must be >= 1, got {depth}")
    if x.shape[1] == 0:
        raise ValueError("rq_encode: x has dim D=0; nothing to quantize")
    if x.shape[0] == 0:
        raise ValueError(f"rq_encode: empty batch (x has shape {_shape(x)}); skip the call when there are no rows")
    if codebooks.dim() not in (2, 3):
        raise ValueError(
            "rq_encode: codebook must be [K, D] (shared by all depths) or [R, K, D] (one per depth), "
            f"got shape {_shape(codebooks)}"
        )
    if codebooks.dim() == 3 and codebooks.shape[0] != depth:
        raise ValueError(
            f"rq_encode: got {codebooks.shape[0]} per-depth codebooks for depth R={depth}; pass one codebook "
            "per depth or a single [K, D] codebook shared by all depths"
        )
    if codebooks.shape[-2] == 0:
        raise ValueError(f"rq_encode: codebook has no codes (shape {_shape(codebooks)})")
    if codebooks.shape[-1] != x.shape[1]:
        raise ValueError(
            f"rq_encode: codebook dim D={codebooks.shape[-1]} does not match x dim D={x.shape[1]}; "
            "project x to the codebook dim first"
        )
    if codebooks.device != x.device:
        raise ValueError(
            f"rq_encode: x is on {x.device} but the codebook is on {codebooks.device}; move both to one device"
        )
    if codes_dtype is not None and codes_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rq_encode: codes_dtype must be torch.int64 or torch.int32, got {codes_dtype}")
    return 1 if codebooks.dim() == 2 else depth


def check_code_stats_args(op, x, codebooks, codes) -> int:
    """Validate x / codebooks / codes of rq_code_stats and ema_update_; returns the depth R."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, D], got shape {_shape(x)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x dtype must be float32, bfloat16 or float16, got {x.dtype}; cast it with x.float()")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous; call x.contiguous()")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: empty batch (x has shape {_shape(x)}); skip the update")
    if codes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: codes must be int64 or int32, got {codes.dtype}")
    if codes.dim() not in (1, 2):
        raise ValueError(
            f"{op}: codes must be [N] (one vector per row) or [N, R] (residual codes of x), got shape {_shape(codes)}"
        )
    if codes.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: codes has {codes.shape[0]} rows but x has {x.shape[0]}")
    depth = codes.shape[1] if codes.dim() == 2 else 1
    if depth < 1:
        raise ValueError(f"{op}: codes has depth R=0; pass at least one code per row")
    if codebooks.dim() not in (2, 3):
        raise ValueError(f"{op}: codebook must be [K, D] or [R, K, D], got shape {_shape(codebooks)}")
    if codebooks.dim() == 3 and codebooks.shape[0] != depth:
        raise ValueError(f"{op}: got {codebooks.shape[0]} per-depth codebooks but codes has depth R={depth}")
    if codebooks.shape[-1] != x.shape[1]:
        raise ValueError(f"{op}: codebook dim D={codebooks.shape[-1]} does not match x dim D={x.shape[1]}")
    if not (codebooks.device == x.device == codes.device):
        raise ValueError(
            f"{op}: x, codes and codebook must be on one device, got {x.device}, {codes.device}, {codebooks.device}"
        )
    num_codes = codebooks.shape[-2]
    if num_codes == 0:
        raise ValueError(f"{op}: codebook has no codes")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(
            f"{op}: codes must lie in [0, K={num_codes}), got min {lo} and max {hi}; "
            "were they produced with a different codebook?"
        )
    return depth


def check_ema_state_args(op, cluster_size, embed_sum, codebook, decay, eps) -> None:
    """Validate the EMA state tensors and hyper-parameters."""
    for t in (cluster_size, embed_sum, codebook):
        if t.dtype != torch.float32:
            raise ValueError(
                f"{op}: EMA state (cluster_size, embed_sum, codebook) must be float32, got {t.dtype}; "
                "keep the codebook buffers in float32"
            )
        if not t.is_contiguous():
            raise ValueError(f"{op}: EMA state must be contiguous; call .contiguous() on the buffers")
        if t.device != codebook.device:
            raise ValueError(f"{op}: EMA state tensors must be on one device")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"{op}: codebook must be [K, D] or [R, K, D], got shape {_shape(codebook)}")
    if embed_sum.shape != codebook.shape:
        raise ValueError(f"{op}: embed_sum shape {_shape(embed_sum)} must equal the codebook shape {_shape(codebook)}")
    if cluster_size.shape != codebook.shape[:-1]:
        raise ValueError(
            f"{op}: cluster_size shape {_shape(cluster_size)} must be the codebook shape {_shape(codebook)} "
            "without its last dim"
        )
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{op}: decay must be in [0, 1), got {decay}")
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def rq_encode(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    depth: int,
    return_cumulative: bool = False,
    codes_dtype: Optional[torch.dtype] = None,
    tile_n: int = 0,
    tile_k: int = 0,
):
    """Greedy residual quantization; see megadual.ops.rq_encode. Returns (codes, quantized, cumulative).

    `cumulative` is [R, N, D] when asked for, else an empty [0] tensor (the op's convention).
    `tile_n` / `tile_k` only shape the kernels' tiling; the reference accepts and ignores them.
    """
    num_codebooks = check_rq_encode_args(x, codebooks, depth, codes_dtype)
    n = x.shape[0]
    cbs = codebooks.float()
    norms = (cbs * cbs).sum(-1)  # [C?, K]: ||e||^2, shared by every row
    residual = x.float().clone()
    quantized = torch.zeros_like(residual)
    codes = torch.empty(n, depth, dtype=torch.int64, device=x.device)
    cumulative = torch.empty(depth, *x.shape, dtype=x.dtype, device=x.device) if return_cumulative else x.new_empty(0)
    for r in range(depth):
        cb = cbs if num_codebooks == 1 else cbs[r]  # [K, D]
        norm = norms if num_codebooks == 1 else norms[r]
        for n0 in range(0, n, ROW_BLOCK):
            # ||x - e||^2 = ||x||^2 + ||e||^2 - 2 x.e; ||x||^2 is the same for every code of a row.
            # argmin returns the first minimum: ties go to the lowest index.
            # The distance order, which the CPU kernels reproduce bit for bit: x.e is one fp32
            # fma per component in increasing d, starting from 0 (what MKL's sgemm computes for
            # this matmul on x86-64), then norm - 2 * dot (2 * dot is exact: one rounding).
            # The fused kernel (kernels/csrc/rq_fused_cpu.cpp) does exactly that; another BLAS
            # may round differently, which moves only fp32 near-ties.
            dist = norm - 2 * (residual[n0 : n0 + ROW_BLOCK] @ cb.T)  # [rows, K]
            codes[n0 : n0 + ROW_BLOCK, r] = dist.argmin(dim=1)
        chosen = cb[codes[:, r]]  # [N, D]
        residual -= chosen
        quantized += chosen
        if return_cumulative:
            cumulative[r] = quantized
    return codes.to(codes_dtype or torch.int64), quantized.to(x.dtype), cumulative


def check_rq_joint_encode_args(x_sem, x_pix, codebooks_sem, codebooks_pix, depth, pixel_weight,
                               codes_dtype=None) -> int:
    """Validate rq_joint_encode's arguments like the C++ op does; returns C (1 = shared codebooks)."""
    num_codebooks = check_rq_encode_args(x_sem, codebooks_sem, depth, codes_dtype)
    if check_rq_encode_args(x_pix, codebooks_pix, depth, codes_dtype) != num_codebooks:
        raise ValueError(
            f"rq_joint_encode: the semantic codebook {_shape(codebooks_sem)} and the pixel codebook "
            f"{_shape(codebooks_pix)} must both be shared by all depths or both be per depth"
        )
    if x_sem.shape[0] != x_pix.shape[0]:
        raise ValueError(f"rq_joint_encode: x_sem has {x_sem.shape[0]} rows but x_pix has {x_pix.shape[0]}; "
                         "pass the two features of the same positions")
    if codebooks_sem.shape[-2] != codebooks_pix.shape[-2]:
        raise ValueError(
            f"rq_joint_encode: the semantic codebook has K={codebooks_sem.shape[-2]} codes and the pixel codebook "
            f"K={codebooks_pix.shape[-2]}; a shared index needs the same K"
        )
    if x_sem.device != x_pix.device:
        raise ValueError(f"rq_joint_encode: x_sem is on {x_sem.device} but x_pix on {x_pix.device}")
    if x_sem.dtype != x_pix.dtype:
        raise ValueError(f"rq_joint_encode: x_sem is {x_sem.dtype} but x_pix is {x_pix.dtype}; cast both to one dtype")
    if not pixel_weight >= 0.0:
        raise ValueError(f"rq_joint_encode: pixel_weight must be >= 0, got {pixel_weight}")
    return num_codebooks


def rq_joint_encode(
    x_sem: torch.Tensor,
    x_pix: torch.Tensor,
    codebooks_sem: torch.Tensor,
    codebooks_pix: torch.Tensor,
    depth: int,
    pixel_weight: float = 1.0,
    return_cumulative: bool = False,
    codes_dtype: Optional[torch.dtype] = None,
):
    """Residual quantization of two features with one index per depth (TokenFlow's shared mapping);
    see megadual.ops.rq_joint_encode. Returns (codes, quantized_sem, quantized_pix, cumulative_sem,
    cumulative_pix), the cumulative ones empty [0] tensors unless asked for.

    The index minimises d_sem + w * d_pix = ||r_sem - e_sem||^2 + w ||r_pix - e_pix||^2, which up
    to a per-row constant is (||e_sem||^2 + w ||e_pix||^2) - 2 [r_sem, w r_pix] . [e_sem, e_pix]:
    one nearest-code search over the concatenated dims, in rq_encode's distance order.
    """
    num_codebooks = check_rq_joint_encode_args(x_sem, x_pix, codebooks_sem, codebooks_pix, depth, pixel_weight,
                                                codes_dtype)
    n = x_sem.shape[0]
    cb_sem, cb_pix = codebooks_sem.float(), codebooks_pix.float()
    joint = torch.cat([cb_sem, cb_pix], dim=-1)  # [C?, K, Ds + Dp]
    norms = (cb_sem * cb_sem).sum(-1) + pixel_weight * (cb_pix * cb_pix).sum(-1)  # [C?, K]
    res_sem, res_pix = x_sem.float().clone(), x_pix.float().clone()
    q_sem, q_pix = torch.zeros_like(res_sem), torch.zeros_like(res_pix)
    codes = torch.empty(n, depth, dtype=torch.int64, device=x_sem.device)
    empty = x_sem.new_empty(0)
    cum_sem = torch.empty(depth, *x_sem.shape, dtype=x_sem.dtype, device=x_sem.device) if return_cumulative else empty
    cum_pix = torch.empty(depth, *x_pix.shape, dtype=x_pix.dtype, device=x_pix.device) if return_cumulative else empty
    for r in range(depth):
        c = 0 if num_codebooks == 1 else r
        cb = joint if num_codebooks == 1 else joint[c]  # [K, Ds + Dp]
        norm = norms if num_codebooks == 1 else norms[c]
        rows = torch.cat([res_sem, pixel_weight * res_pix], dim=-1)  # [N, Ds + Dp], against [e_sem, e_pix]
        for n0 in range(0, n, ROW_BLOCK):
            dist = norm - 2 * (rows[n0 : n0 + ROW_BLOCK] @ cb.T)  # rq_encode's distance order; ties to the lowest k
            codes[n0 : n0 + ROW_BLOCK, r] = dist.argmin(dim=1)
        for res, q, book, cum in ((res_sem, q_sem, cb_sem, cum_sem), (res_pix, q_pix, cb_pix, cum_pix)):
            chosen = (book if num_codebooks == 1 else book[c])[codes[:, r]]
            res -= chosen
            q += chosen
            if return_cumulative:
                cum[r] = q
    return (codes.to(codes_dtype or torch.int64), q_sem.to(x_sem.dtype), q_pix.to(x_pix.dtype), cum_sem, cum_pix)


def rq_code_stats(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor):
    """Per-code counts [C?, K] and sums [C?, K, D] (float32) of the vectors assigned to each code.

    With codes [N, R], the vector that depth r assigned is the residual x - sum_{j<r} e[codes[:, j]];
    with a shared codebook all depths' (residual, code) pairs land in one set of statistics.
    """
    depth = check_code_stats_args("rq_code_stats", x, codebooks, codes)
    codes = codes.long().reshape(x.shape[0], depth)
    cbs = codebooks.float()
    counts = torch.zeros(codebooks.shape[:-1], dtype=torch.float32, device=x.device)
    sums = torch.zeros(codebooks.shape, dtype=torch.float32, device=x.device)
    residual = x.float().clone()
    ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    for r in range(depth):
        shared = codebooks.dim() == 2
        cb, cnt, sm = (cbs, counts, sums) if shared else (cbs[r], counts[r], sums[r])
        cnt.index_add_(0, codes[:, r], ones)
        sm.index_add_(0, codes[:, r], residual)
        residual -= cb[codes[:, r]]
    return counts, sums


def ema_apply_(cluster_size, embed_sum, codebook, counts, sums, decay: float, eps: float) -> None:
    """EMA of counts and sums, then codebook = embed_sum / Laplace-smoothed counts (in place)."""
    check_ema_state_args("ema_apply_", cluster_size, embed_sum, codebook, decay, eps)
    if counts.shape != cluster_size.shape or sums.shape != embed_sum.shape:
        raise ValueError(
            f"ema_apply_: counts {_shape(counts)} / sums {_shape(sums)} must match cluster_size "
            f"{_shape(cluster_size)} / embed_sum {_shape(embed_sum)}"
        )
    num_codes = codebook.shape[-2]
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    # Laplace smoothing keeps a rarely used code from dividing by ~0 and preserves the total n.
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + num_codes * eps) * n
    codebook.copy_(embed_sum / smoothed.unsqueeze(-1))


def ema_update_(cluster_size, embed_sum, codebook, x, codes, decay: float, eps: float) -> None:
    """rq_code_stats followed by ema_apply_: the whole EMA codebook step, in place."""
    check_ema_state_args("ema_update_", cluster_size, embed_sum, codebook, decay, eps)
    check_code_stats_args("ema_update_", x, codebook, codes)
    counts, sums = rq_code_stats(x, codebook, codes)
    ema_apply_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)


def find_dead_codes(cluster_size: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices [M] (int64) of the codes whose EMA count is below `threshold`."""
    return (cluster_size < threshold).nonzero()[:, 0]


def sample_restart_rows(num_dead: int, num_samples: int, generator=None, device=None) -> torch.Tensor:
    """Which sample rows replace the dead codes: [M] int64 indices into [0, S).

    Distinct rows (a permutation prefix) when S >= M, otherwise drawn with replacement. Drawn
    on the generator's device (else `device`), so a seeded generator gives the same rows as the
    compiled op.
    """
    device = generator.device if generator is not None else device
    if num_samples >= num_dead:
        return torch.randperm(num_samples, generator=generator, device=device)[:num_dead]
    return torch.randint(num_samples, (num_dead,), generator=generator, device=device)


def restart_codes_(cluster_size, embed_sum, codebook, dead, replacements, reset_count: float) -> None:
    """Overwrite dead codes with `replacements` [M, D]; their EMA restarts at count `reset_count`."""
    replacements = replacements.float()
    codebook.index_copy_(0, dead, replacements)
    embed_sum.index_copy_(0, dead, replacements * reset_count)
    cluster_size.index_fill_(0, dead, reset_count)


def dead_code_restart_(cluster_size, embed_sum, codebook, samples, threshold: float = 1.0, generator=None):
    """Replace codes with EMA count < threshold by random rows of `samples`; returns their indices [M]."""
    check_ema_state_args("dead_code_restart_", cluster_size, embed_sum, codebook, 0.0, 1.0)
    if codebook.dim() != 2:
        raise ValueError(
            f"dead_code_restart_: codebook must be [K, D], got shape {_shape(codebook)}; "
            "call it once per depth for per-depth codebooks"
        )
    if samples.dim() != 2 or samples.shape[1] != codebook.shape[1]:
        raise ValueError(f"dead_code_restart_: samples must be [S, D={codebook.shape[1]}], got shape {_shape(samples)}")
    if samples.dtype not in _FLOATS:
        raise ValueError(f"dead_code_restart_: samples dtype must be float32, bfloat16 or float16, got {samples.dtype}")
    if samples.shape[0] == 0:
        raise ValueError("dead_code_restart_: empty batch (no samples to restart codes from)")
    if samples.device != codebook.device:
        raise ValueError(
            f"dead_code_restart_: samples are on {samples.device} but the codebook is on {codebook.device}"
        )
    if threshold < 0:
        raise ValueError(f"dead_code_restart_: threshold must be >= 0, got {threshold}")
    dead = find_dead_codes(cluster_size, threshold)
    if dead.numel() == 0:
        return dead
    rows = sample_restart_rows(dead.numel(), samples.shape[0], generator, samples.device)
    restart_codes_(cluster_size, embed_sum, codebook, dead, samples[rows.to(samples.device)], threshold)
    return dead
