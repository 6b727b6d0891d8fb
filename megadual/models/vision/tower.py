"""The SigLIP vision tower of the DualToken tokenizer, tapped at two depths.

Shapes: B batch, H = W image side, T = (H // patch)^2 tokens, C hidden size.

Layers count from 1: the output of layer i is Hugging Face's `hidden_states[i]` of
`SiglipVisionModel` (index 0 is the patch + position embedding). The tokenizer reads

- pixel features: the output of `pixel_layer`, plus `shortcut_weight` x the output of
  `shortcut_layer` (DualToken's shortcut from layer 4 into layer 6's features);
- semantic features: the output of `semantic_layer`;

and after quantizing the semantic features runs them through the layers after
`semantic_layer`, the post-layernorm and the attention-pooling head (`tail`). The layers are
transformers' own modules, called one by one, so the taps equal HF's hidden states exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadual.config.schema import VisionTowerConfig

# Loading transformers may import torchvision: the package's __init__ has applied the fix.
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402

# Fields of SiglipVisionConfig that our VisionTowerConfig states; a local HF directory must agree.
_SIZE_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}


class TowerTaps(NamedTuple):
    """Tower features at the two taps.

    Attributes:
        pixel: [B, T, C] output of pixel_layer (+ shortcut_weight x output of shortcut_layer).
        semantic: [B, T, C] output of semantic_layer.
    """

    pixel: torch.Tensor
    semantic: torch.Tensor


def siglip_config(cfg: VisionTowerConfig) -> SiglipVisionConfig:
    """A transformers SiglipVisionConfig with the sizes of `cfg` (attention pooling head on)."""
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=True,
        attn_implementation=cfg.attn_impl,
    )


def build_siglip(cfg: VisionTowerConfig, seed: int = 0, prefix: str = "tokenizer.tower") -> SiglipVisionModel:
    """The SigLIP vision model `cfg` names: loaded from `cfg.hf_path`, or random from `seed`.

    Raises:
        FileNotFoundError: `hf_path` is not a directory.
        ValueError: the directory's sizes differ from `cfg`'s, or it has no pooling head.
    """
    if cfg.hf_path is None:
        # Seeded without touching the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SiglipVisionModel(siglip_config(cfg))
    else:
        import os

        if not os.path.isdir(cfg.hf_path):
            raise FileNotFoundError(f"{prefix}.hf_path: {cfg.hf_path!r} is not a directory (never downloaded)")
        model = SiglipVisionModel.from_pretrained(cfg.hf_path, attn_implementation=cfg.attn_impl)
        for ours, theirs in _SIZE_FIELDS.items():
            if getattr(model.config, theirs) != getattr(cfg, ours):
                raise ValueError(
                    f"{prefix}.{ours}: got {getattr(cfg, ours)}, but {cfg.hf_path} has {theirs}="
                    f"{getattr(model.config, theirs)}; set {prefix}.{ours}={getattr(model.config, theirs)}"
                )
    if not getattr(model, "use_head", False):
        raise ValueError(f"{prefix}: the SigLIP tower needs its attention-pooling head (vision_use_head=true)")
    return model.float()


class SiglipTower(nn.Module):
    """A `SiglipVisionModel` run layer by layer, with DualToken's taps.

    Args:
        model: the transformers vision model (its modules become this module's children).
        cfg: which layers to tap.

    Attributes:
        gradient_checkpointing: recompute each encoder layer in backward (saves activations).
    """

    def __init__(self, model: SiglipVisionModel, cfg: VisionTowerConfig):
        super().__init__()
        self.model = model
        self.pixel_layer, self.semantic_layer = cfg.pixel_layer, cfg.semantic_layer
        self.shortcut_layer, self.shortcut_weight = cfg.shortcut_layer, cfg.shortcut_weight
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layers)

    def _layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.model.encoder.layers[index]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, None, use_reentrant=False)
        return layer(hidden, None)

    def taps(self, pixels: torch.Tensor) -> TowerTaps:
        """Run the layers up to the deeper tap.

        Args:
            pixels: [B, 3, H, W] in [-1, 1].

        Returns:
            TowerTaps(pixel [B, T, C], semantic [B, T, C]).
        """
        hidden = self.model.embeddings(pixels)  # [B, T, C]
        outputs: dict[int, torch.Tensor] = {}
        wanted = {self.pixel_layer, self.semantic_layer}
        if self.shortcut_layer is not None:
            wanted.add(self.shortcut_layer)
        for i in range(max(wanted)):
            hidden = self._layer(i, hidden)
            if i + 1 in wanted:
                outputs[i + 1] = hidden
        pixel = outputs[self.pixel_layer]
        if self.shortcut_layer is not None and self.shortcut_weight:
            pixel = pixel + self.shortcut_weight * outputs[self.shortcut_layer]
        return TowerTaps(pixel, outputs[self.semantic_layer])

    def tail(self, semantic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers after semantic_layer, post-layernorm and pooling head.

        Args:
            semantic: [B, T, C], (quantized) features at semantic_layer.

        Returns:
            (last hidden state [B, T, C] after the post-layernorm, pooled [B, C]).
        """
        hidden = semantic
        for i in range(self.semantic_layer, self.num_layers):
            hidden = self._layer(i, hidden)
        hidden = self.model.post_layernorm(hidden)
        return hidden, self.model.head(hidden)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unquantized semantic features and pooled output (what the frozen teacher provides).

        Returns:
            (semantic [B, T, C] at semantic_layer, pooled [B, C]).
        """
        semantic = self.taps(pixels).semantic
        return semantic, self.tail(semantic)[1]


def frozen_copy(tower: SiglipTower) -> SiglipTower:
    """An eval-mode copy of `tower` with no trainable parameters: the semantic teacher."""
    import copy

    teacher = copy.deepcopy(tower)
    teacher.eval()
    teacher.gradient_checkpointing = False
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

