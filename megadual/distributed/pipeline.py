"""The Qwen2 backbone as a DeepSpeed `PipelineModule`, built from the single-process blocks.

Legend: B batch, T time, D hidden, V/p vocabulary slice of a tensor-parallel rank.

Layer list: [embedding] + [decoder layer] * L + [final norm] + [output head]. Between stages
DeepSpeed sends a tuple (hidden [B, T, D], position_ids [B, T], cu_seqlens [B*T + 1]).
DeepSpeed's pipeline engine fixes the shapes of that tuple at the first micro-batch, so
cu_seqlens always travels padded to B*T + 1 entries (empty documents at the end), which
the attention planner accepts. With tied embeddings the head is a `TiedLayerSpec` of the
embedding: DeepSpeed keeps one weight on the first and last stage and sums its gradients.
Each block is initialised with `block_rng(seed, index)`, so the stages hold exactly the
weights of the single-process model built with the same seed.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megadual.config.schema import BackboneConfig
from megadual.distributed.comm import ProcessGroup, copy_to_group
from megadual.distributed.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megadual.distributed.topology import Topology
from megadual.models.qwen2.attention import plan_attention
from megadual.models.qwen2.layers import DecoderLayer, RotaryEmbedding
from megadual.models.qwen2.model import block_rng

StageActivations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pad_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Offsets padded with the final offset to `num_tokens + 1` entries (a fixed shape)."""
    pad = num_tokens + 1 - cu_seqlens.numel()
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(pad)]) if pad > 0 else cu_seqlens


class EmbeddingStage(nn.Module):
    """Token embedding; as the tied output head it also projects hidden states to logits."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup, seed: Optional[int]):
        super().__init__()
        self.tp_group = tp_group
        with block_rng(seed, 0):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, cfg.init_std)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(ids, position_ids, cu_seqlens, *extra) -> (embeddings, position_ids, cu_seqlens, *extra);
        extra tensors (the unified model's codes and modality mask) pass through to the next layer."""
        input_ids, position_ids, cu_seqlens, *extra = inputs
        return (self.embed_tokens(input_ids), position_ids, cu_seqlens, *extra)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head: [B, T, D] -> logits [B, T, V/p]."""
        return F.linear(copy_to_group(hidden, self.tp_group), self.embed_tokens.weight)


def _tied_head_forward(stage: EmbeddingStage, hidden: torch.Tensor) -> torch.Tensor:
    return stage.project(hidden)


class DecoderStage(nn.Module):
    """One decoder layer; builds its own attention plan and RoPE angles from what it receives."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup, seed: Optional[int], index: int):
        super().__init__()
        self.cfg = cfg
        with block_rng(seed, 1 + index):
            self.layer = DecoderLayer(cfg, tp_group)
        self.rotary = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)

    def forward(self, inputs: StageActivations) -> StageActivations:
        hidden, position_ids, cu_seqlens = inputs
        b, t, _ = hidden.shape
        plan = plan_attention(b, t, hidden.device, hidden.dtype, cu_seqlens, self.cfg.attn_impl)
        hidden = self.layer(hidden, self.rotary(position_ids, hidden.dtype), plan)
        return hidden, position_ids, cu_seqlens


class FinalNormStage(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, inputs: StageActivations) -> torch.Tensor:
        return self.norm(inputs[0])


class HeadStage(nn.Module):
    """Untied output projection: [B, T, D] -> logits [B, T, V/p]."""

    def __init__(self, cfg: BackboneConfig, tp_group: ProcessGroup, seed: Optional[int]):
        super().__init__()
        with block_rng(seed, cfg.num_layers + 1):
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, False, tp_group, cfg.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def build_pipeline_module(
    cfg: BackboneConfig,
    topology: Topology,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    seed: Optional[int] = None,
    activation_checkpoint_interval: int = 0,
) -> PipelineModule:
    """The backbone split into `topology.layout.pp` stages by DeepSpeed.

    Args:
        loss_fn: (logits [B, T, V/p], labels [B, T]) -> scalar loss, run on the last stage.
        activation_checkpoint_interval: recompute every N layers in backward (0: off).
    """
    group = topology.tp_group
    if cfg.tie_embeddings:
        first, last = tied_embedding_specs(cfg, group, seed, _tied_head_forward)
    else:
        first = LayerSpec(EmbeddingStage, cfg, group, seed)
        last = LayerSpec(HeadStage, cfg, group, seed)
    layers = [first, *[LayerSpec(DecoderStage, cfg, group, seed, i) for i in range(cfg.num_layers)],
              LayerSpec(FinalNormStage, cfg), last]
    return split_into_stages(layers, topology, loss_fn, activation_checkpoint_interval)


def tied_embedding_specs(cfg: BackboneConfig, group: ProcessGroup, seed: Optional[int],
                         head_forward: Callable) -> tuple[TiedLayerSpec, TiedLayerSpec]:
    """The embedding as the first layer and, through `head_forward`, as the last stage's text head:
    DeepSpeed keeps one weight on both stages and sums its gradients."""
    first = TiedLayerSpec("embed", EmbeddingStage, cfg, group, seed, tied_weight_attr=["embed_tokens.weight"])
    last = TiedLayerSpec("embed", EmbeddingStage, cfg, group, seed, forward_fn=head_forward,
                         tied_weight_attr=["embed_tokens.weight"])
    return first, last


def split_into_stages(layers: list, topology: Topology, loss_fn: Callable,
                      activation_checkpoint_interval: int) -> PipelineModule:
    """DeepSpeed's PipelineModule over `layers`, balancing decoder layers across the stages."""
    layout = topology.layout
    return PipelineModule(
        layers=layers,
        topology=PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp),
        loss_fn=loss_fn,
        partition_method="type:DecoderStage",
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Only decoder layers: DeepSpeed's reentrant checkpoint of the embedding (whose input,
        # token ids, needs no gradient) would return a hidden state cut off from autograd.
        checkpointable_layers=["DecoderStage"],
    )


# Names: pipeline layer i's state dict <-> the single-process model's state dict. Layer 0 is
# the embedding, 1..L the decoder layers, L+1 the final norm, L+2 the output head (absent from
# checkpoints when tied: DeepSpeed saves a tied module once, with its first layer).


def pipeline_to_model_name(layer: int, key: str, num_layers: int) -> str:
    """`Qwen2ForCausalLM` state-dict name of tensor `key` of pipeline layer `layer`."""
    if layer == 0:
        return f"backbone.{key}"
    if layer <= num_layers:
        return f"backbone.layers.{layer - 1}.{key.removeprefix('layer.')}"
    if layer == num_layers + 1:
        return f"backbone.{key}"
    if layer == num_layers + 2:
        return key
    raise ValueError(f"pipeline layer {layer} does not exist in a {num_layers}-layer backbone")


def model_to_pipeline_name(name: str, num_layers: int) -> tuple[int, str]:
    """(pipeline layer, key) holding `Qwen2ForCausalLM` tensor `name`."""
    if name.startswith("backbone.embed_tokens."):
        return 0, name.removeprefix("backbone.")
    if name.startswith("backbone.layers."):
        index, key = name.removeprefix("backbone.layers.").split(".", 1)
        return 1 + int(index), f"layer.{key}"
    if name.startswith("backbone.norm."):
        return num_layers + 1, name.removeprefix("backbone.")
    if name.startswith("lm_head."):
        return num_layers + 2, name
    raise ValueError(f"{name!r} is not a backbone tensor")
