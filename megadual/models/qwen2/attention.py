"""Causal self-attention kernels for full and packed (multi-document) sequences.

Legend: B batch, T time, H query heads, G key/value heads, E head dim, N = B*T tokens.

Two backends behind one call:
- PyTorch SDPA (default, any device, any dtype). Packed rows get a block-diagonal causal
  mask built once per forward and shared by every layer.
- flash-attn 2 varlen (CUDA, fp16/bf16, when installed): packed rows are passed as
  `cu_seqlens` and never see a mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """True when flash-attn 2 imports (it only builds against a CUDA torch)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # an ImportError, or a broken CUDA build that fails at import
        return False
    return True


@dataclass
class AttentionPlan:
    """What every layer's attention needs to know about the batch, computed once per forward.

    Attributes:
        backend: "sdpa" or "flash".
        mask: SDPA only: bool [B, 1, T, T] block-diagonal causal mask for packed rows,
            None for plain causal rows (SDPA then takes its `is_causal` fast path).
        cu_seqlens: flash only: int32 [num_docs + 1] document offsets over the N flat tokens.
        max_seqlen: flash only: the longest document.
    """

    backend: str
    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0


def validate_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> list[int]:
    """Check document offsets over the flattened batch and return them as a list.

    Raises:
        ValueError: not 1-D integer, not starting at 0, decreasing, or not ending at `num_tokens`.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of document offsets, got shape "
            f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at batch*seq_len={num_tokens}, got {offsets[:3]}...{offsets[-2:]}"
        )
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    return offsets


def plan_attention(
    batch: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    cu_seqlens: Optional[torch.Tensor],
    impl: str = "auto",
) -> AttentionPlan:
    """Choose the backend and build the per-batch mask or offsets.

    Args:
        batch, seq_len: shape of the token grid.
        cu_seqlens: document offsets over the B*T flattened tokens (packed input), or None
            when every row is one causal sequence. Documents must not cross row boundaries.
        impl: "auto" | "sdpa" | "flash".
    """
    use_flash = (
        impl in ("auto", "flash")
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and flash_attn_available()
    )
    if impl == "flash" and not use_flash:
        raise ValueError(
            "attn_impl='flash' needs flash-attn installed, a CUDA device and fp16/bf16 activations "
            f"(got device={device.type}, dtype={dtype}, flash-attn installed={flash_attn_available()}); "
            "use attn_impl='auto' to fall back to SDPA"
        )
    if cu_seqlens is None:
        return AttentionPlan(backend="flash" if use_flash else "sdpa")

    num_tokens = batch * seq_len
    offsets = validate_cu_seqlens(cu_seqlens, num_tokens)
    for start, end in zip(offsets, offsets[1:]):
        if end > start and start // seq_len != (end - 1) // seq_len:
            raise ValueError(
                f"a packed document spans tokens [{start}, {end}) across a row boundary (seq_len={seq_len}); "
                "every document must lie inside one row"
            )
    if use_flash:
        # Documents never cross rows (checked above), so the offsets already split the rows;
        # empty documents are dropped because flash-attn gains nothing from them.
        bounds = sorted(set(offsets))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return AttentionPlan(backend="flash", cu_seqlens=cu, max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])))

    # Document id of each flat token: the number of offsets at or before it. Shape [B, T].
    positions = torch.arange(num_tokens, device=device)
    doc_ids = torch.searchsorted(cu_seqlens.to(device)[1:], positions, right=True).view(batch, seq_len)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return AttentionPlan(backend="sdpa", mask=(same_doc & causal).unsqueeze(1))  # [B, 1, T, T]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Causal attention with grouped-query heads.

    Shapes:
        q: [B, T, H, E]; k, v: [B, T, G, E] with H a multiple of G.
        returns [B, T, H, E].
    """
    if plan.backend == "flash":
        return _flash_attention(q, k, v, plan)
    # SDPA wants heads before time; `enable_gqa` shares each KV head across its query group
    # without materialising repeated keys and values.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|G, T, E]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)  # [B, T, H, E]


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if plan.cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True)
    b, t = q.shape[:2]
    flat = [x.reshape(b * t, *x.shape[2:]) for x in (q, k, v)]  # [N, H|G, E]
    out = flash_attn_varlen_func(
        *flat, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, causal=True
    )
    return out.view(b, t, *out.shape[1:])
