"""Public kernel API: batched residual quantization and EMA codebook updates.

Shapes: N rows, D dim, K codes, R depth, C codebooks (1 when shared by all depths, else R),
S restart samples, M dead codes.

Each function runs the compiled op (`torch.ops.megadual.*`, from the `megadual._C`
extension) when it is built, and otherwise the PyTorch reference in
`megadual.ops.reference`, with one warning per process. The extension is loaded on the first
call, never at import: `import megadual.ops` costs no more than `import torch`. Set
MEGADUAL_DISABLE_EXT=1 to force the reference.

Nothing here is differentiable: codes are integers, and the straight-through estimator and
the commitment loss belong to the module that uses them (megadual.models.vision.quantizer).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch

from megadual.ops import reference

__all__ = [
    "RQEncoding",
    "RQJointEncoding",
    "dead_code_restart_",
    "ema_apply_",
    "ema_update_",
    "extension_available",
    "find_dead_codes",
    "reference",
    "restart_codes_",
    "rq_code_stats",
    "rq_encode",
    "rq_joint_encode",
    "sample_restart_rows",
]

# None: not tried yet; True: torch.ops.megadual is registered; False: use the reference.
_extension_loaded: Optional[bool] = None


def extension_available() -> bool:
    """Load `megadual._C` on first use; True when the compiled ops are registered.

    Returns:
        False (after one RuntimeWarning) when the extension is not built or
        MEGADUAL_DISABLE_EXT=1; the ops then run the PyTorch reference.
    """
    global _extension_loaded
    if _extension_loaded is None:
        if os.environ.get("MEGADUAL_DISABLE_EXT", "0") == "1":
            reason = "MEGADUAL_DISABLE_EXT=1"
            _extension_loaded = False
        else:
            try:
                import megadual._C  # noqa: F401  (registers torch.ops.megadual.*)
                from megadual.ops import _fake  # noqa: F401  (fake kernels need the schemas)

                _extension_loaded = True
            except ImportError as exc:
                reason = f"the extension megadual._C is not built ({exc})"
                _extension_loaded = False
        if not _extension_loaded:
            warnings.warn(
                f"megadual.ops: {reason}; using the PyTorch reference (slower, same results). "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _extension_loaded


class RQEncoding(NamedTuple):
    """Result of `rq_encode`.

    Attributes:
        codes: [N, R] int64 (or int32), the code chosen at each depth.
        quantized: [N, D] in x's dtype, the sum over depths of the chosen codes.
        cumulative: [R, N, D] in x's dtype, the running sum after each depth (cumulative[-1]
            equals quantized), or None when not asked for.
    """

    codes: torch.Tensor
    quantized: torch.Tensor
    cumulative: Optional[torch.Tensor]


def rq_encode(
    x: torch.Tensor,
    codebook_or_codebooks: torch.Tensor,
    depth: int,
    *,
    return_cumulative: bool = False,
    codes_dtype: torch.dtype = torch.int64,
    tile_n: int = 0,
    tile_k: int = 0,
) -> RQEncoding:
    """Greedy residual vector quantization of a batch of rows.

    At each depth the current residual's nearest code (squared euclidean distance, ties to the
    lowest index) is chosen and subtracted. The distance search is tiled: no N x K matrix is
    ever allocated (extra memory O(tile + N * R + K * D)). Computed in float32 for bf16/fp16
    inputs.

    Args:
        x: [N, D] float32 / bfloat16 / float16, contiguous, N > 0.
        codebook_or_codebooks: [K, D] shared by all depths, or [R, K, D] one per depth.
        depth: R >= 1.
        return_cumulative: also return the running quantized sum after each depth (for the
            commitment loss); costs R x N x D memory.
        codes_dtype: torch.int64 (default) or torch.int32.
        tile_n, tile_k: rows / codes per distance tile of the compiled kernels; 0 picks the
            tuned default. They never change the result.

    Returns:
        RQEncoding(codes [N, R], quantized [N, D], cumulative [R, N, D] or None).

    Raises:
        ValueError: wrong dtype, non-contiguous input, mismatched D, R < 1, empty batch,
            a per-depth codebook count that is not R.
    """
    if extension_available():
        codes, quantized, cumulative = torch.ops.megadual.rq_encode(
            x.detach(),
            codebook_or_codebooks.detach(),
            depth,
            return_cumulative,
            codes_dtype,
            tile_n,
            tile_k,
        )
    else:
        codes, quantized, cumulative = reference.rq_encode(
            x.detach(), codebook_or_codebooks.detach(), depth, return_cumulative, codes_dtype
        )
    return RQEncoding(codes, quantized, cumulative if return_cumulative else None)


class RQJointEncoding(NamedTuple):
    """Result of `rq_joint_encode`: one code per depth indexes both codebooks.

    Attributes:
        codes: [N, R] int64 (or int32).
        quantized_sem, quantized_pix: [N, Ds] / [N, Dp], each part's sum over depths of its codes.
        cumulative_sem, cumulative_pix: [R, N, Ds] / [R, N, Dp] running sums, or None.
    """

    codes: torch.Tensor
    quantized_sem: torch.Tensor
    quantized_pix: torch.Tensor
    cumulative_sem: Optional[torch.Tensor]
    cumulative_pix: Optional[torch.Tensor]


def rq_joint_encode(
    x_sem: torch.Tensor,
    x_pix: torch.Tensor,
    codebooks_sem: torch.Tensor,
    codebooks_pix: torch.Tensor,
    depth: int,
    pixel_weight: float = 1.0,
    *,
    return_cumulative: bool = False,
    codes_dtype: torch.dtype = torch.int64,
) -> RQJointEncoding:
    """Residual quantization of two features of the same rows with one shared index per depth
    (TokenFlow's shared mapping): code k pairs semantic code k with pixel code k, and each depth
    picks the k minimising ||r_sem - e_sem[k]||^2 + pixel_weight * ||r_pix - e_pix[k]||^2 (ties to the
    lowest k), then subtracts e_sem[k] and e_pix[k] from their residuals. Searched like
    `rq_encode` over the concatenated dims: no N x K matrix is allocated.

    Args:
        x_sem: [N, Ds], x_pix: [N, Dp]; float32 / bfloat16 / float16 (one dtype), contiguous.
        codebooks_sem: [K, Ds] or [R, K, Ds]; codebooks_pix: [K, Dp] or [R, K, Dp] (same K, both
            shared by all depths or both per depth).
        depth: R >= 1.
        pixel_weight: w >= 0, the pixel distance's weight (TokenFlow uses 1).
        return_cumulative: also return each part's running sums (for the commitment losses).
        codes_dtype: torch.int64 (default) or torch.int32.

    Returns:
        RQJointEncoding(codes [N, R], quantized_sem, quantized_pix, cumulative_sem, cumulative_pix).

    Raises:
        ValueError: any argument rq_encode would refuse for either part, or parts that do not
            pair up (rows, K, dtype, shared vs per-depth codebooks), or w < 0.
    """
    args = (x_sem.detach(), x_pix.detach(), codebooks_sem.detach(), codebooks_pix.detach(), depth,
            float(pixel_weight), return_cumulative, codes_dtype)
    if extension_available():
        out = torch.ops.megadual.rq_joint_encode(*args)
    else:
        out = reference.rq_joint_encode(*args)
    codes, q_sem, q_pix, cum_sem, cum_pix = out
    return RQJointEncoding(codes, q_sem, q_pix, cum_sem if return_cumulative else None,
                           cum_pix if return_cumulative else None)


def rq_code_stats(x: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code assignment counts and vector sums of one batch (the data-parallel half of an EMA step).

    Args:
        x: [N, D] float, contiguous: the quantizer's input rows.
        codebook: [K, D] shared or [R, K, D] per depth; the codebook the codes came from.
        codes: [N] (x's rows are the vectors) or [N, R] (residual codes: depth r's vector is
            x - sum_{j<r} e[codes[:, j]], recomputed here, never stored), int64 or int32.

    Returns:
        (counts [K] or [R, K], sums [K, D] or [R, K, D]), float32. With a shared codebook every
        depth's (residual, code) pairs feed the one set of statistics.

    Raises:
        ValueError: bad shapes or dtypes, empty batch, codes outside [0, K).
    """
    if extension_available():
        return torch.ops.megadual.rq_code_stats(x.detach(), codebook.detach(), codes)
    return reference.rq_code_stats(x.detach(), codebook.detach(), codes)


def ema_apply_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """Fold (all-reduced) batch statistics into the EMA state and renormalise the codebook, in place.

    cluster_size <- decay * cluster_size + (1 - decay) * counts (same for embed_sum), then
    codebook <- embed_sum / ((cluster_size + eps) / (n + K * eps) * n), n = cluster_size.sum().

    Args:
        cluster_size: [K] or [R, K] float32 EMA counts.
        embed_sum: [K, D] or [R, K, D] float32 EMA sums.
        codebook: [K, D] or [R, K, D] float32.
        counts, sums: from `rq_code_stats`, same shapes as cluster_size / embed_sum.
        decay: in [0, 1).
        eps: > 0, the Laplace smoothing.
    """
    if extension_available():
        torch.ops.megadual.ema_apply_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
    else:
        reference.ema_apply_(cluster_size, embed_sum, codebook, counts, sums, decay, eps)


def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """One fused EMA codebook step on a single process: count, scatter-add, EMA, normalise.

    Same result as `ema_apply_(..., *rq_code_stats(x, codebook, codes), decay, eps)` up to
    float32 summation order. With data parallelism, all-reduce the statistics between the two
    halves instead (what ResidualQuantizer does).

    Args:
        cluster_size: [K] or [R, K] float32, updated in place.
        embed_sum: [K, D] or [R, K, D] float32, updated in place.
        codebook: [K, D] or [R, K, D] float32, read for the residuals, then overwritten.
        x: [N, D] float, contiguous.
        codes: [N] or [N, R] int64 / int32 (see `rq_code_stats`).
        decay: in [0, 1).
        eps: > 0.

    Raises:
        ValueError: bad shapes or dtypes, empty batch, codes outside [0, K), decay or eps out of range.
    """
    if extension_available():
        torch.ops.megadual.ema_update_(cluster_size, embed_sum, codebook, x.detach(), codes, decay, eps)
    else:
        reference.ema_update_(cluster_size, embed_sum, codebook, x.detach(), codes, decay, eps)


def dead_code_restart_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    samples: torch.Tensor,
    threshold: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Replace dead codes (EMA count < threshold) by random rows of `samples`, in place.

    Distinct rows are drawn when S >= M (else with replacement) from `generator`, so a seeded
    generator makes the restart deterministic. A restarted code gets codebook row = sample,
    cluster_size = threshold and embed_sum = threshold * sample.

    Args:
        cluster_size: [K] float32.
        embed_sum: [K, D] float32.
        codebook: [K, D] float32 (call once per depth for per-depth codebooks).
        samples: [S, D] float, S > 0: current-batch vectors.
        threshold: EMA count below which a code is dead (default 1).
        generator: torch.Generator for the draw (its device is where indices are drawn).

    Returns:
        [M] int64 indices of the restarted codes (possibly empty).
    """
    if extension_available():
        return torch.ops.megadual.dead_code_restart_(
            cluster_size, embed_sum, codebook, samples.detach(), threshold, generator
        )
    return reference.dead_code_restart_(cluster_size, embed_sum, codebook, samples.detach(), threshold, generator)


# Pieces of dead_code_restart_ for data parallelism, where the draw happens on one rank and
# the chosen rows are shared before every rank applies them. Plain PyTorch: they are tiny.
find_dead_codes = reference.find_dead_codes
sample_restart_rows = reference.sample_restart_rows
restart_codes_ = reference.restart_codes_
