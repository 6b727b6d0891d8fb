"""Choosing the next token from logits: classifier-free guidance, temperature, top-k, top-p.

Legend: N rows (sequences or visual positions), K choices (vocabulary or codebook).

Pure functions on logits, shared by text decoding and the depth heads. On tensor-parallel
ranks, pass identical (gathered) logits and identically seeded generators: every rank then
draws the same ids without a broadcast.
"""

from __future__ import annotations

from typing import Optional

import torch


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + scale * (cond - uncond)`.

    Scale 1 gives the conditional logits, 0 the unconditional ones, > 1 pushes away from
    the unconditional distribution. Shapes: cond, uncond [..., K] -> [..., K].
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond logits must have one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the rest unchanged).

    Args:
        top_k: keep the k largest per row (0: off). Ties at the k-th value are all kept.
        top_p: keep the smallest set of largest logits whose probability reaches top_p
            (1: off); the most likely choice is always kept.
    Shapes: logits [N, K] -> [N, K].
    """
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a choice when the choices before it already reach top_p (so the first stays).
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw one id per row; temperature 0 is greedy (argmax, top-k/top-p irrelevant).

    Shapes: logits [N, K] -> int64 [N]. Sampling runs in fp32.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
