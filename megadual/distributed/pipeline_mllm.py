"""The unified DualToken MLLM as a DeepSpeed `PipelineModule` (heads on the last stage).

Legend: B batch, T time, D hidden, R residual depth.

Layer list: [text embedding] + [visual embedding] + [decoder layer] * L + [final norm] +
[text head] + [depth heads]. The first stage receives (input_ids, position_ids, cu_seqlens,
pixel_codes, semantic_codes, modality_mask); the text embedding passes the visual inputs
through to the visual embedding, which writes the visual positions and sends (hidden,
position_ids, cu_seqlens) on, as in the backbone pipeline. The last stage's layers return
the final hidden states, and the loss (text NLL through the text head, code NLL through the
depth heads: `megadual.models.mllm.compute_losses`) runs on them with the labels tuple
(labels, pixel_labels, semantic_labels). With tied embeddings the text head is the first
stage's embedding, shared by DeepSpeed as for the backbone. Blocks are seeded exactly as in
`DualTokenMLLM`, so every layout starts from the single-process model's weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from megadual.config.schema import BackboneConfig, MLLMConfig
from megadual.distributed.comm import ProcessGroup
from megadual.distributed.pipeline import (
    DecoderStage,
    EmbeddingStage,
    FinalNormStage,
    HeadStage,
    pipeline_to_model_name,
    split_into_stages,
    tied_embedding_specs,
)
from megadual.distributed.topology import Topology
from megadual.models.heads import DepthHead
from megadual.models.mllm import compute_losses
from megadual.models.qwen2.model import block_rng
from megadual.models.visual_embedding import VisualEmbedding

LABEL_KEYS = ("labels", "pixel_labels", "semantic_labels")
INPUT_KEYS = ("input_ids", "position_ids", "cu_seqlens", "pixel_codes", "semantic_codes", "modality_mask")


class VisualEmbedStage(nn.Module):
    """Writes the visual embedding at visual positions (block seed as in DualTokenMLLM)."""

    def __init__(self, backbone: BackboneConfig, mllm: MLLMConfig, seed: Optional[int]):
        super().__init__()
        with block_rng(seed, backbone.num_layers + 2):
            self.visual_embed = VisualEmbedding(mllm, backbone.hidden_size)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, position_ids, cu_seqlens, pixel_codes, semantic_codes, modality_mask = inputs
        visual = self.visual_embed(pixel_codes[modality_mask], semantic_codes[modality_mask])  # [Nvis, D]
        return x.index_put((modality_mask,), visual.to(x.dtype)), position_ids, cu_seqlens


class DepthHeadsStage(nn.Module):
    """Holds the pixel and semantic depth heads; passes the hidden states to the loss."""

    def __init__(self, backbone: BackboneConfig, mllm: MLLMConfig, seed: Optional[int]):
        super().__init__()
        d, n = backbone.hidden_size, backbone.num_layers
        kw = dict(hidden_size=d, depth=mllm.depth, width=mllm.resolved_head_width(d), num_layers=mllm.head_layers,
                  num_heads=mllm.head_heads, mlp_ratio=mllm.head_mlp_ratio, init_std=mllm.init_std)
        with block_rng(seed, n + 3):
            self.pixel_head = DepthHead(codebook_size=mllm.pixel_codebook_size, **kw)
        with block_rng(seed, n + 4):
            self.semantic_head = DepthHead(codebook_size=mllm.semantic_codebook_size, **kw)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _pass_hidden(stage: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The tied embedding's place on the last stage: it only has to exist (its weight is the text head)."""
    return hidden


class _PassHead(HeadStage):
    """The untied text head's place in the layer list: holds the weight, passes the hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class MLLMPipelineLoss:
    """loss_fn of the pipeline: bound to the last stage's text head and depth heads once built."""

    def __init__(self, mllm: MLLMConfig, tp_group: ProcessGroup):
        self.mllm, self.tp_group = mllm, tp_group
        self.text_head = None
        self.heads: Optional[DepthHeadsStage] = None

    def __call__(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch = dict(zip(LABEL_KEYS, labels))
        return compute_losses(hidden, batch, self.text_head, self.heads.pixel_head, self.heads.semantic_head,
                              self.mllm.visual_loss_weight, self.tp_group).loss


def build_mllm_pipeline_module(backbone: BackboneConfig, mllm: MLLMConfig, topology: Topology,
                               seed: Optional[int] = None, activation_checkpoint_interval: int = 0) -> PipelineModule:
    """The unified model split into `topology.layout.pp` stages by DeepSpeed."""
    layout, group = topology.layout, topology.tp_group
    if backbone.tie_embeddings:
        first, text_head = tied_embedding_specs(backbone, group, seed, _pass_hidden)
    else:
        first = LayerSpec(EmbeddingStage, backbone, group, seed)
        text_head = LayerSpec(_PassHead, backbone, group, seed)
    layers = [first, LayerSpec(VisualEmbedStage, backbone, mllm, seed),
              *[LayerSpec(DecoderStage, backbone, group, seed, i) for i in range(backbone.num_layers)],
              LayerSpec(FinalNormStage, backbone), text_head, LayerSpec(DepthHeadsStage, backbone, mllm, seed)]
    loss = MLLMPipelineLoss(mllm, group)
    module = split_into_stages(layers, topology, loss, activation_checkpoint_interval)
    if topology.pp_rank == layout.pp - 1:
        local = list(module.forward_funcs)
        loss.heads = next(f for f in local if isinstance(f, DepthHeadsStage))
        if backbone.tie_embeddings:
            loss.text_head = module.tied_modules["embed"].project
        else:
            loss.text_head = next(f for f in local if isinstance(f, _PassHead)).lm_head
    return module


def pipeline_inputs(batch: dict) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """((inputs for the first stage), (labels for the last)) of one packed batch."""
    return tuple(batch[k] for k in INPUT_KEYS), tuple(batch[k] for k in LABEL_KEYS)


# Names: pipeline layer i's state dict <-> `DualTokenMLLM`'s state dict. The layer list above
# is the backbone pipeline's (megadual.distributed.pipeline) with the visual embedding inserted
# at index 1 and the depth heads appended; a tied text head is absent from checkpoints.


def mllm_pipeline_num_layers(num_layers: int) -> int:
    """Pipeline layers of the unified model with `num_layers` decoder layers."""
    return num_layers + 5


def mllm_text_head_layer(num_layers: int) -> int:
    """Index of the text head in the layer list (with tied embeddings DeepSpeed saves it with layer 0)."""
    return num_layers + 3


def mllm_pipeline_to_model_name(layer: int, key: str, num_layers: int) -> str:
    """`DualTokenMLLM` state-dict name of tensor `key` of pipeline layer `layer`.

    The visual embedding and depth-heads stages hold their modules under the model's own
    attribute names (visual_embed, pixel_head, semantic_head), so their keys carry over.
    """
    if layer == 1 or layer == num_layers + 4:
        return key
    if not 0 <= layer < mllm_pipeline_num_layers(num_layers):
        raise ValueError(f"pipeline layer {layer} does not exist in the unified model with {num_layers} decoder layers")
    backbone_layer = 0 if layer == 0 else layer - 1  # the backbone pipeline lacks the visual stage
    return f"lm.{pipeline_to_model_name(backbone_layer, key, num_layers)}"
