"""Causal self-attention kernels for full and packed (multi-document) sequences.

Legend: B batch, T time, H query heads, G key/value heads, E head dim, N = B*T tokens.

Three backends behind one call, chosen per forward by `plan_attention` ("auto": the first
that applies):
- flash-attn 2 varlen (CUDA, fp16/bf16, when installed): packed rows are passed as
  `cu_seqlens` and never see a mask.
- FlexAttention (CUDA, packed rows, when flash-attn is absent): a compiled kernel that
  skips the blocks a document mask rules out, so a packed row costs what its documents
  cost instead of a full T x T. The block mask is cached per batch layout (documents
  offsets), so repeated layouts and every pipeline stage reuse one. On CPU it runs
  forward only (torch has no CPU backward for it); `attn_impl="flex"` asks for it there.
- PyTorch SDPA (any device, any dtype; the last fallback). Packed rows get a
  block-diagonal causal bool mask built once per forward and shared by every layer.
"""

from __future__ import annotations

import functools
import importlib.util
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


def flex_attention_available() -> bool:
    """True when this torch ships FlexAttention (torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@dataclass
class AttentionPlan:
    """What every layer's attention needs to know about the batch, computed once per forward.

    Attributes:
        backend: "sdpa", "flash" or "flex".
        mask: SDPA only: bool [B, 1, T, T] block-diagonal causal mask for packed rows,
            None for plain causal rows (SDPA then takes its `is_causal` fast path).
        cu_seqlens: flash only: int32 [num_docs + 1] document offsets over the N flat tokens.
        max_seqlen: flash only: the longest document.
        block_mask: flex only: the document-causal `BlockMask` of the batch layout.
    """

    backend: str
    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    block_mask: Optional[object] = None


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
    """Choose the backend and build the per-batch mask, block mask or offsets.

    Args:
        batch, seq_len: shape of the token grid.
        cu_seqlens: document offsets over the B*T flattened tokens (packed input), or None
            when every row is one causal sequence. Documents must not cross row boundaries.
        impl: "auto" | "sdpa" | "flash" | "flex".
    """
    backend = _choose_backend(impl, device, dtype, packed=cu_seqlens is not None)
    if cu_seqlens is None:
        # Plain causal rows: flex gains nothing over SDPA's own causal kernels.
        return AttentionPlan(backend="flash" if backend == "flash" else "sdpa")

    offsets = validate_cu_seqlens(cu_seqlens, batch * seq_len)
    for start, end in zip(offsets, offsets[1:]):
        if end > start and start // seq_len != (end - 1) // seq_len:
            raise ValueError(
                f"a packed document spans tokens [{start}, {end}) across a row boundary (seq_len={seq_len}); "
                "every document must lie inside one row"
            )
    if backend == "flash":
        # Documents never cross rows (checked above), so the offsets already split the rows;
        # empty documents are dropped because flash-attn gains nothing from them.
        bounds = sorted(set(offsets))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return AttentionPlan(backend="flash", cu_seqlens=cu, max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])))
    if backend == "flex":
        return AttentionPlan(backend="flex", block_mask=_document_block_mask(tuple(offsets), batch, seq_len, str(device)))
    doc = _document_ids(offsets, batch, seq_len, device)
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return AttentionPlan(backend="sdpa", mask=(same_doc & causal).unsqueeze(1))  # [B, 1, T, T]


def _choose_backend(impl: str, device: torch.device, dtype: torch.dtype, packed: bool) -> str:
    half = dtype in (torch.float16, torch.bfloat16)
    on_cuda = device.type == "cuda"
    if impl == "flash" and not (on_cuda and half and flash_attn_available()):
        raise ValueError(
            "attn_impl='flash' needs flash-attn installed, a CUDA device and fp16/bf16 activations "
            f"(got device={device.type}, dtype={dtype}, flash-attn installed={flash_attn_available()}); "
            "use attn_impl='auto' to fall back to FlexAttention or SDPA"
        )
    if impl == "flex" and not flex_attention_available():
        raise ValueError(
            f"attn_impl='flex' needs torch >= 2.5 (FlexAttention), this is torch {torch.__version__}; "
            "use attn_impl='auto' or 'sdpa'"
        )
    if impl != "auto":
        return impl
    if on_cuda and half and flash_attn_available():
        return "flash"
    if on_cuda and packed and flex_attention_available():
        return "flex"
    return "sdpa"


def _document_ids(offsets: list[int], batch: int, seq_len: int, device) -> torch.Tensor:
    """Document index of each token, [B, T]: the number of document ends at or before it."""
    ends = torch.tensor(offsets[1:], device=device)
    return torch.searchsorted(ends, torch.arange(batch * seq_len, device=device), right=True).view(batch, seq_len)


@functools.lru_cache(maxsize=32)
def _document_block_mask(offsets: tuple[int, ...], batch: int, seq_len: int, device: str):
    """The document-causal BlockMask of one batch layout, built once per layout.

    Packed loaders repeat layouts (fixed-length packing, the same batch on every pipeline
    stage and micro-batch recomputation), and building a block mask costs a pass over
    every (query block, key block) pair, so it is cached on the offsets themselves.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc = _document_ids(list(offsets), batch, seq_len, device)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, batch, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    # Uncompiled flex_attention materialises the full score matrix; compiled, it is a
    # fused kernel that skips masked-out blocks. One compiled callable serves every layer.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Causal attention with grouped-query heads.

    Shapes:
        q: [B, T, H, E]; k, v: [B, T, G, E] with H a multiple of G.
        returns [B, T, H, E].
    """
    if plan.backend == "flash":
        return _flash_attention(q, k, v, plan)
    if plan.backend == "flex":
        return _flex_attention(q, k, v, plan)
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


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError(
            "attn_impl='flex' runs forward only on CPU (torch has no CPU backward for FlexAttention); "
            "use attn_impl='auto' or 'sdpa' to train on CPU"
        )
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H|G, T, E]
    out = _compiled_flex_attention()(q, k, v, block_mask=plan.block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)  # [B, T, H, E]
