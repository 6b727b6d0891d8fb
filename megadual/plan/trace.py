"""What a forward pass keeps for backward and what it computes, measured on the meta device.

A module and its inputs built on `meta` hold shapes and no memory, so a full-size layer can be
run on any machine. Autograd's saved-tensor hooks see every tensor the forward keeps for the
backward (unique storages are summed; parameters are left out, they are model state), and
torch's FlopCounterMode counts the matmul and convolution FLOPs.

Attention is the one op whose meta version misleads: on meta, SDPA falls back to its math
path, which keeps the full T x T probabilities. The GPU kernels MegaDual runs (flash-attn,
FlexAttention, SDPA's flash kernel) keep q, k, v, the output and one fp32 log-sum-exp per
query row instead, so the trace swaps in an op that keeps exactly those, and counts its FLOPs
itself (halved when causal: the kernels skip the masked half).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Trace:
    """saved_bytes: activations kept for backward; forward_flops: matmul + conv + attention."""

    saved_bytes: int
    forward_flops: int


class _FlashLikeAttention(torch.autograd.Function):
    """Shapes and saved tensors of a flash kernel: q [B, H, Tq, E], k/v [B, G, Tk, E] -> [B, H, Tq, E]."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, H, Tq]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: traces stop at the forward
        raise RuntimeError("a planning trace has no backward")


@contextlib.contextmanager
def _flash_like_attention(counter: list) -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        b, h, tq, e = q.shape
        causal = is_causal or attn_mask is not None  # MegaDual's masks are (document-)causal
        counter[0] += int(4 * b * h * tq * k.shape[-2] * e * (0.5 if causal else 1.0))  # QK^T and AV
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def trace_forward(run: Callable[[], object], modules: list[torch.nn.Module]) -> Trace:
    """Run `run()` (a forward on meta tensors) and measure it.

    Args:
        run: builds the output whose backward the step would take (loss included).
        modules: every module `run` uses; their parameters are not activations.
    """
    parameters = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    attention_flops = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_like_attention(attention_flops), \
            FlopCounterMode(display=False) as flops:
        run()
    return Trace(saved_bytes=sum(storages.values()), forward_flops=flops.get_total_flops() + attention_flops[0])
