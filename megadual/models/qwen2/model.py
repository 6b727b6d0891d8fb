"""The Qwen2/Qwen2.5 decoder and its causal-LM head.

Legend: B batch, T time, D hidden, V vocabulary, N = B*T tokens.

`Qwen2Model` maps token ids (or ready embeddings, for the multimodal model) to final hidden
states; `Qwen2ForCausalLM` adds the (optionally tied) output projection and returns logits.
With a tensor-parallel group of size p the embedding and the output projection are split
over the vocabulary and the logits are this rank's slice [B, T, V/p] (feed them to
`vocab_parallel_cross_entropy`; `gather_vocab_logits` assembles [B, T, V]).
Weights are initialised in the constructors (normal(0, init_std), zero biases, unit norms)
from the global RNG, as `deepspeed.zero.Init` requires: it partitions each parameter as
soon as its module is built.
Packed input: pass `position_ids` that restart per document and `cu_seqlens`, the document
offsets over the N flattened tokens; no token then attends across a document boundary.
Incremental decoding: pass a `KVCache` (cache.py); positions continue from the cached real
tokens, and the result equals running the whole sequence at once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadual.config.schema import BackboneConfig
from megadual.distributed.comm import ProcessGroup
from megadual.distributed.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from .attention import plan_attention
from .cache import KVCache
from .layers import DecoderLayer, RotaryEmbedding


@contextlib.contextmanager
def block_rng(seed: Optional[int], index: int) -> Iterator[None]:
    """Initialise block `index` (0 embedding, 1..L decoder layers, L+1 output head) from its own
    seed, leaving the global RNG as it was.

    A block's initial weights then depend only on (seed, index), never on which other blocks
    this process builds: a pipeline stage holding layers 5..8 gets the same weights as the
    single-process model. With seed None the global RNG is used as is.
    """
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + index)
        yield


def default_position_ids(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Positions 0..T-1 for every row. Shape [B, T]."""
    return torch.arange(seq_len, device=device).expand(batch, seq_len)


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm.

    Args:
        cfg: the backbone section of the config.
        tp_group: tensor-parallel process group, or None for a plain model.
        seed: initialise each block from its own seed (see `block_rng`); None: global RNG.
    """

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup = None, seed: Optional[int] = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        with block_rng(seed, 0):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, cfg.init_std)
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            with block_rng(seed, 1 + i):
                self.layers.append(DecoderLayer(cfg, tp_group))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)
        # Recompute each layer's activations in backward instead of storing them.
        self.activation_checkpointing = False

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError if any id lies outside [0, vocab_size): an embedding lookup would
        otherwise crash on CPU or read garbage on GPU."""
        if input_ids.numel() == 0:
            return
        low, high = torch.aminmax(input_ids)
        low, high = int(low), int(high)
        if low < 0 or high >= self.cfg.vocab_size:
            bad = high if high >= self.cfg.vocab_size else low
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size}); check the text "
                "tokenizer matches backbone.vocab_size"
            )

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            input_ids: int64 [B, T] token ids; exactly one of this and `inputs_embeds`.
            position_ids: int [B, T]; default 0..T-1 per row.
            cu_seqlens: int [num_docs + 1] document offsets over the B*T flattened tokens
                (packed input), or None when each row is one sequence.
            inputs_embeds: [B, T, D] embeddings to use instead of looking up `input_ids`.
            kv_cache: decoding: the T tokens follow the S already cached (and are appended to
                the cache); default positions continue from the cached real tokens. Not with
                `cu_seqlens`. Inference only (under torch.no_grad()).
            attention_mask: with `kv_cache` only: bool [B, T], False on (left) padding tokens,
                which no later token attends to.

        Returns:
            Final-norm hidden states [B, T, D].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if self.cfg.check_token_ids:
                self.check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        if kv_cache is not None:
            return self._decode(inputs_embeds, position_ids, cu_seqlens, kv_cache, attention_mask)
        if attention_mask is not None:
            raise ValueError("attention_mask is only used with kv_cache; pack unpadded documents with cu_seqlens instead")
        if position_ids is None:
            position_ids = default_position_ids(b, t, inputs_embeds.device)
        elif position_ids.shape != (b, t):
            raise ValueError(f"position_ids must have shape {(b, t)}, got {tuple(position_ids.shape)}")

        plan = plan_attention(b, t, inputs_embeds.device, inputs_embeds.dtype, cu_seqlens, self.cfg.attn_impl)
        rope = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, plan, use_reentrant=False)
            else:
                x = layer(x, rope, plan)
        return self.norm(x)

    def _decode(self, x, position_ids, cu_seqlens, kv_cache: KVCache, attention_mask) -> torch.Tensor:
        """The cached path of `forward`, kept apart so the training path stays as it was."""
        b, t, _ = x.shape
        if cu_seqlens is not None:
            raise ValueError("kv_cache does not take packed input (cu_seqlens); decode one sequence per row")
        if len(kv_cache.layers) != len(self.layers):
            raise ValueError(
                f"the KVCache has {len(kv_cache.layers)} layers, this model {len(self.layers)}; "
                "build it with KVCache(cfg.num_layers)"
            )
        if position_ids is None:
            position_ids = kv_cache.position_ids(attention_mask, b, t, x.device)
        elif position_ids.shape != (b, t):
            raise ValueError(f"position_ids must have shape {(b, t)}, got {tuple(position_ids.shape)}")
        plan = kv_cache.begin_step(attention_mask, b, t, x.device)
        rope = self.rotary(position_ids, x.dtype)
        for layer, kv in zip(self.layers, kv_cache.layers):
            x = layer(x, rope, plan, kv)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 decoder plus output projection; `forward` returns logits [B, T, V/p] (p = tp size).

    With `cfg.tie_embeddings` the output projection shares the input embedding's weight
    (both are split over the vocabulary the same way, so the shards tie too).
    """

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup = None, seed: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.backbone = Qwen2Model(cfg, tp_group, seed)
        with block_rng(seed, cfg.num_layers + 1):
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, False, tp_group, cfg.init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share embedding and output weights when configured; call again after any load that
        replaces parameters (e.g. `load_state_dict(..., assign=True)`)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [B, T, V/p] (same arguments as `Qwen2Model.forward`)."""
        return self.lm_head(self.backbone(input_ids, position_ids, cu_seqlens, inputs_embeds, kv_cache, attention_mask))


def build_qwen2(cfg: BackboneConfig, seed: Optional[int] = None, tp_group: ProcessGroup = None) -> Qwen2ForCausalLM:
    """A randomly initialised causal LM, deterministic given `seed` (the global RNG is left as it was).

    At any tensor-parallel size the shards equal slices of the tp=1 model built with the same
    seed, and any pipeline stage's blocks equal the same blocks of the whole model.
    """
    return Qwen2ForCausalLM(cfg, tp_group, seed)
