"""Key/value cache for incremental decoding with the Qwen2 decoder.

Legend: B batch, S cached tokens, T new tokens, G key/value heads (this tensor-parallel
rank's), E head dim.

    cache = KVCache(cfg.num_layers)
    hidden = model(prompt_ids, kv_cache=cache, attention_mask=prompt_mask)   # prefill
    hidden = model(next_ids[:, None], kv_cache=cache)                        # one step; positions continue

The cache stores each layer's keys after RoPE, so a step only rotates its own new keys.
Rows may be left-padded (batched prompts of different lengths): `attention_mask` marks real
tokens, padded keys are never attended to, and default positions count real tokens only
(position = number of real tokens before it), which is what Hugging Face's generate does.
Decoding always uses PyTorch SDPA with an explicit mask (the mask is [B, 1, T, S+T]; at
T = 1 it is one row), never the packed `cu_seqlens` path. Inference only: the buffers are
written in place, so the cache refuses tensors that require grad.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import AttentionPlan

_MIN_CAPACITY = 64  # first allocation in tokens; growth doubles, so T steps cost O(log T) copies


class LayerKV:
    """One layer's cached keys and values, in buffers that grow by doubling.

    Shapes: the buffers are [B, capacity, G, E]; `update` returns views [B, S+T, G, E].
    """

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values k, v [B, T, G, E]; return all of them, [B, S+T, G, E]."""
        if k.requires_grad or v.requires_grad:
            raise ValueError("KVCache is for inference: run decoding under torch.no_grad()")
        b, t = k.shape[:2]
        if self.keys is None:
            capacity = max(_MIN_CAPACITY, t)
            self.keys = k.new_empty((b, capacity, *k.shape[2:]))
            self.values = v.new_empty((b, capacity, *v.shape[2:]))
        elif self.keys.shape[0] != b:
            raise ValueError(f"the cache holds {self.keys.shape[0]} rows, this step has {b}; use one cache per batch")
        elif self.length + t > self.keys.shape[1]:
            capacity = max(2 * self.keys.shape[1], self.length + t)
            grown_k = self.keys.new_empty((b, capacity, *self.keys.shape[2:]))
            grown_v = self.values.new_empty((b, capacity, *self.values.shape[2:]))
            grown_k[:, : self.length] = self.keys[:, : self.length]
            grown_v[:, : self.length] = self.values[:, : self.length]
            self.keys, self.values = grown_k, grown_v
        end = self.length + t
        self.keys[:, self.length : end] = k
        self.values[:, self.length : end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """The decoder's cache: one `LayerKV` per decoder layer plus which cached tokens are real.

    Args:
        num_layers: decoder layers of the model it serves (checked by `Qwen2Model.forward`).

    Attributes:
        layers: the per-layer caches, in layer order.
        valid: bool [B, S], True where a cached token is real (False: left padding), or None
            while empty.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.valid: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        """S, the number of cached tokens (padding included)."""
        return 0 if self.valid is None else self.valid.shape[1]

    def _new_valid(self, attention_mask: Optional[torch.Tensor], b: int, t: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device)
        if attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask must have the shape of the new tokens {(b, t)}, got {tuple(attention_mask.shape)}"
            )
        return attention_mask.to(device=device, dtype=torch.bool)

    def position_ids(self, attention_mask: Optional[torch.Tensor], b: int, t: int, device) -> torch.Tensor:
        """Default positions of T new tokens: the number of real tokens before each. Shape [B, T].

        Padding tokens get the position of the next real token minus one, clamped at 0
        (their outputs are never used).
        """
        new = self._new_valid(attention_mask, b, t, device)
        before = torch.zeros(b, dtype=torch.long, device=device) if self.valid is None else self.valid.sum(1)
        return (before[:, None] + new.long().cumsum(1) - 1).clamp_(min=0)

    def begin_step(self, attention_mask: Optional[torch.Tensor], b: int, t: int, device) -> AttentionPlan:
        """Record which of the T new tokens are real and return the attention plan of this step.

        Call once per forward, before the layers append their keys. A new token attends to
        every real token at or before it, and always to itself (so a padded row of only
        padding still has a finite softmax).
        """
        if self.valid is not None and self.valid.shape[0] != b:
            raise ValueError(f"the cache holds {self.valid.shape[0]} rows, this step has {b}; use one cache per batch")
        new = self._new_valid(attention_mask, b, t, device)
        s = self.length
        self.valid = new if self.valid is None else torch.cat([self.valid, new], dim=1)  # [B, S+T]
        query_pos = torch.arange(s, s + t, device=device)  # absolute index of each new token
        key_pos = torch.arange(s + t, device=device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S+T]
        mask = causal[None] & self.valid[:, None, :]  # [B, T, S+T]
        mask = mask | (key_pos[None, :] == query_pos[:, None])[None]  # always see yourself
        return AttentionPlan(backend="sdpa", mask=mask[:, None])  # [B, 1, T, S+T]
