"""Activations and FLOPs of one micro-batch on one rank, from meta-device traces of the real modules.

Shapes: b micro-batch rows, T seq_len, D hidden, V vocabulary, p tensor-parallel size,
Nt text and Nv visual positions of the micro-batch, R depth, K codebook size.

A decoder layer is traced once at this rank's tensor-parallel shapes (heads, KV heads and MLP
width divided by p): its saved tensors are what every layer keeps without activation
checkpointing; with it, a layer keeps only its input [b, T, D] and one layer is recomputed at
a time. The head of the step is traced with its loss: the text head over Nt positions
(vocab-parallel logits [Nt, V/p]) and, for the unified model, both depth heads over Nv
positions ([Nv, R, K] logits each; replicated, not split, across tensor-parallel ranks). The
backward of a cross entropy briefly holds two fp32 gradients of its logits' size, and the
backbone trainer keeps its logits alive through the backward: both are added on top of the
saved tensors.

Packed documents: attention FLOPs scale with the document length (causal attention over a
row of T tokens in documents of length L costs T L / 2, not T^2 / 2), so the trace's
attention count is scaled by L / T.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from megadual.config.schema import Config
from megadual.models.qwen2.attention import AttentionPlan
from megadual.models.qwen2.layers import DecoderLayer, RotaryEmbedding

from .memory import DTYPE_BYTES
from .trace import Trace, trace_forward

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A cross entropy's backward holds two fp32 tensors of its logits' size at once (the gradient
# at the log-softmax output and at its input), whatever the training dtype.
_LOSS_BACKWARD_BYTES = 8


@dataclass(frozen=True)
class MicroBatchWork:
    """One micro-batch on one rank: the repeated layer, and the parts around the layers.

    first / last: Traces of what runs on the first / last pipeline stage besides the layers.
    head_transient_bytes: the cross entropies' backward peak (module docstring).
    tokens: tokens (or image patches) the micro-batch trains on.
    """

    layer: Trace
    layer_input_bytes: int
    num_layers: int
    tokens: int
    first: dict[str, Trace] = field(default_factory=dict)
    last: dict[str, Trace] = field(default_factory=dict)
    head_transient_bytes: int = 0
    split_by_tp: frozenset = frozenset()  # parts of first/last that tensor parallelism splits


def _scaled(t: Trace, attention_flops: int, scale: float) -> Trace:
    return Trace(t.saved_bytes, int(t.forward_flops - attention_flops * (1.0 - scale)))


def _rank_backbone(cfg: Config, tp: int):
    b = cfg.backbone
    return dataclasses.replace(b, num_heads=b.num_heads // tp, num_kv_heads=b.num_kv_heads // tp,
                               intermediate_size=b.intermediate_size // tp, head_dim=b.resolved_head_dim)


def _layer_trace(cfg: Config, tp: int, rows: int, dtype: torch.dtype, doc_len: int) -> Trace:
    rank_cfg = _rank_backbone(cfg, tp)
    seq = cfg.train.seq_len
    with torch.device("meta"):
        layer = DecoderLayer(rank_cfg).to(dtype)
        rope = RotaryEmbedding(rank_cfg.resolved_head_dim, rank_cfg.rope_theta)(
            torch.zeros(rows, seq, dtype=torch.long), dtype)
        x = torch.empty(rows, seq, rank_cfg.hidden_size, dtype=dtype, requires_grad=True)
    traced = trace_forward(lambda: layer(x, rope, AttentionPlan("sdpa")), [layer])
    heads, e = rank_cfg.num_heads, rank_cfg.resolved_head_dim
    attention = int(4 * rows * heads * seq * seq * e * 0.5)  # what the trace counted for plain causal rows
    return _scaled(traced, attention, min(doc_len, seq) / seq)


def _text_head_trace(cfg: Config, tp: int, positions: int, dtype: torch.dtype) -> Trace:
    d, v = cfg.backbone.hidden_size, cfg.backbone.vocab_size // tp
    with torch.device("meta"):
        norm, head = nn.RMSNorm(d).to(dtype), nn.Linear(d, v, bias=False).to(dtype)
        hidden = torch.empty(positions, d, dtype=dtype, requires_grad=True)
        targets = torch.zeros(positions, dtype=torch.long)
    return trace_forward(lambda: F.cross_entropy(head(norm(hidden)).float(), targets), [norm, head])


def _depth_head_trace(head: nn.Module, hidden_size: int, positions: int, depth: int, dtype: torch.dtype) -> Trace:
    with torch.device("meta"):
        hidden = torch.empty(positions, hidden_size, dtype=dtype, requires_grad=True)
        codes = torch.zeros(positions, depth, dtype=torch.long)
    return trace_forward(lambda: F.cross_entropy(head(hidden, codes).flatten(0, 1).float(), codes.flatten()), [head])


def split_positions(cfg: Config, command: str, tokens: int, caption_tokens: int) -> tuple[int, int]:
    """(text, visual) positions of a micro-batch: every unified-model sample is one image of
    num_positions codes, its caption and three markers (module docstring of megadual.plan)."""
    if command != "train":
        return tokens, 0
    image = cfg.mllm.num_positions
    visual = round(tokens * image / (image + caption_tokens + 3))
    return tokens - visual, visual


def backbone_work(cfg: Config, command: str, models: dict[str, nn.Module], tp: int, rows: int,
                  caption_tokens: int, doc_len: int) -> MicroBatchWork:
    """The micro-batch of `train-lm` or `train` (the unified model) at tp ranks and `rows` rows."""
    dtype = _TORCH_DTYPES[cfg.train.dtype]
    b = DTYPE_BYTES[cfg.train.dtype]
    tokens = rows * cfg.train.seq_len
    text, visual = split_positions(cfg, command, tokens, caption_tokens)
    layer = _layer_trace(cfg, tp, rows, dtype, doc_len)
    last = {"text head + loss": _text_head_trace(cfg, tp, text, dtype)}
    text_logits = text * (cfg.backbone.vocab_size // tp)
    # train-lm's step holds its logits until the step ends; the unified model's loss drops them.
    transient = text_logits * (_LOSS_BACKWARD_BYTES + (b if command == "train-lm" else 0))
    first = {}
    if command == "train":
        mllm = models["mllm"].to(dtype)
        m = cfg.mllm
        for name, head in (("pixel depth head + loss", mllm.pixel_head), ("semantic depth head + loss", mllm.semantic_head)):
            last[name] = _depth_head_trace(head, cfg.backbone.hidden_size, visual, m.depth, dtype)
        codebook = max(m.pixel_codebook_size, m.semantic_codebook_size)
        transient = max(transient, visual * m.depth * codebook * _LOSS_BACKWARD_BYTES)
        with torch.device("meta"):
            codes = torch.zeros(visual, m.depth, dtype=torch.long)
        first["visual embedding"] = trace_forward(lambda: mllm.visual_embed(codes, codes, check=False),
                                                  [mllm.visual_embed])
    return MicroBatchWork(layer, tokens * cfg.backbone.hidden_size * b, cfg.backbone.num_layers, tokens,
                          first, last, transient, frozenset({"text head + loss"}))


def tokenizer_work(cfg: Config, models: dict[str, nn.Module], rows: int) -> MicroBatchWork:
    """The tokenizer's micro-batch of `rows` images: the tower's encoder layers are the
    repeated layer; the tower's embeddings and tail, the pixel decoder and the discriminator
    the rest. Left out: the residual quantizers' few saved tensors ([b, positions,
    codebook_dim]; their meta run needs data-dependent ops) and LPIPS's backward through its
    frozen VGG, so a tokenizer plan is low by about one VGG-16 forward's activations."""
    # bf16 is autocast there: activations in bf16, weights (and so model states) in fp32.
    activation_dtype = cfg.tokenizer_train.dtype
    dtype = _TORCH_DTYPES[activation_dtype]
    tok, disc = models["tokenizer"].to(dtype), models["discriminator"].to(dtype)
    tower, size = tok.tower, cfg.tokenizer.tower.image_size
    grid, hidden = cfg.tokenizer.tower.grid_size, tower.hidden_size
    with torch.device("meta"):
        images = torch.empty(rows, 3, size, size, dtype=dtype)
        states = torch.empty(rows, grid * grid, hidden, dtype=dtype, requires_grad=True)
        latent = torch.empty(rows, hidden, grid, grid, dtype=dtype, requires_grad=True)
        recon = torch.empty(rows, 3, size, size, dtype=dtype, requires_grad=True)
    whole = trace_forward(lambda: tower(images), [tower])
    layer = trace_forward(lambda: tower.model.encoder.layers[0](states, None)[0], [tower])
    n = tower.num_layers
    rest = Trace(whole.saved_bytes - n * layer.saved_bytes, whole.forward_flops - n * layer.forward_flops)
    last = {"tower embeddings + tail": rest,
            "pixel decoder": trace_forward(lambda: tok.decoder(latent), [tok.decoder]),
            "discriminator": trace_forward(lambda: disc(recon), [disc])}
    b = DTYPE_BYTES[activation_dtype]
    return MicroBatchWork(layer, rows * grid * grid * hidden * b, n, rows * grid * grid, {}, last, 0)
