"""The blocks of a Qwen2 decoder: rotary embedding, attention, SwiGLU MLP, decoder layer.

Legend: B batch, T time, D hidden, H query heads, G key/value heads, E head dim, F MLP width.

Tensor parallelism (Megatron): Q, K, V and the MLP's gate/up are column-parallel (each rank
holds H/tp query heads, G/tp kv heads, F/tp MLP columns), the output and down projections
row-parallel. Heads are always recovered with `view(b, t, -1, head_dim)`, never with a head
count, so a shard runs through the same code unchanged; with `tp_group=None` the layers
are plain.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megadual.config.schema import BackboneConfig
from megadual.distributed.comm import ProcessGroup
from megadual.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from .attention import AttentionPlan, causal_attention
from .cache import LayerKV


class RotaryEmbedding(nn.Module):
    """RoPE angles for arbitrary (e.g. per-document restarting) positions.

    The inverse frequencies are recomputed per call instead of stored as a buffer: it is
    E/2 numbers, and it keeps meta-device construction and checkpoint loading free of
    buffers that must be re-materialised.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: position_ids [B, T] -> cos, sin [B, T, 1, E] in `dtype` (angles in fp32)."""
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # [E/2]
        angles = position_ids[..., None].float() * inv_freq  # [B, T, E/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, T, 1, E]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + E/2) of every head. Shapes: x [B, T, H, E], cos/sin [B, T, 1, E]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with bias on Q, K, V (Qwen2) and none on the output."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup = None):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        q_width, kv_width = cfg.num_heads * self.head_dim, cfg.num_kv_heads * self.head_dim
        d, std = cfg.hidden_size, cfg.init_std
        self.q_proj = ColumnParallelLinear(d, q_width, cfg.qkv_bias, tp_group, std)
        self.k_proj = ColumnParallelLinear(d, kv_width, cfg.qkv_bias, tp_group, std)
        self.v_proj = ColumnParallelLinear(d, kv_width, cfg.qkv_bias, tp_group, std)
        self.o_proj = RowParallelLinear(q_width, d, False, tp_group, std)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan, kv: Optional[LayerKV] = None
    ) -> torch.Tensor:
        """Shapes: x [B, T, D] -> [B, T, D] (H and G are per tensor-parallel rank).

        With `kv` (decoding), the new keys/values are appended to the cache and the T new
        queries attend to all S+T of them; `plan` then comes from `KVCache.begin_step`.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)  # [B, T, H, E]
        k = self.k_proj(x).view(b, t, -1, self.head_dim)  # [B, T, G, E]
        v = self.v_proj(x).view(b, t, -1, self.head_dim)  # [B, T, G, E]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # [B, S+T, G, E]
        out = causal_attention(q, k, v, plan)
        return self.o_proj(out.reshape(b, t, -1))  # [B, T, H*E] -> [B, T, D]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup = None):
        super().__init__()
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.init_std
        self.gate_proj = ColumnParallelLinear(d, f, False, tp_group, std)
        self.up_proj = ColumnParallelLinear(d, f, False, tp_group, std)
        self.down_proj = RowParallelLinear(f, d, False, tp_group, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x [B, T, D] -> [B, T, D] through [B, T, F]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup = None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, tp_group)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg, tp_group)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], plan: AttentionPlan, kv: Optional[LayerKV] = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, plan, kv)
        return x + self.mlp(self.mlp_norm(x))
