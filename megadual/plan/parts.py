"""Exact parameter counts of every part of a training command's models, built on `meta`.

A part is a group of parameters that lives together on a rank: the embedding, the decoder
layers, the final norm and head, the unified model's visual embedding and depth heads, the
tokenizer's tower, quantizers, decoder and discriminator. Counts come from the modules the
trainers build (no weights are allocated), so they follow every config option.

Tensor parallelism splits the weights of column/row-parallel and vocab-parallel layers; the
rest (norms, depth heads, visual embedding) is replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megadual.config.schema import Config
from megadual.distributed.tensor_parallel import partition_dims

# Where a part sits in a pipeline: on the first stage, spread over all stages (the decoder
# layers), or on the last; "all" for models that never run in a pipeline (the tokenizer).
STAGES = ("first", "layers", "last", "all")


@dataclass(frozen=True)
class Part:
    """params: count over the whole model; sharded: of which tensor parallelism splits;
    largest_module: the most parameters any one module holds directly (ZeRO-3 gathers a
    module at a time); trainable: False for frozen parts (teacher, LPIPS)."""

    name: str
    params: int
    sharded: int
    largest_module: int
    stage: str = "all"
    trainable: bool = True

    def per_rank(self, tp: int, pp: int = 1, num_layers: int = 1) -> int:
        """Parameters of this part on one rank of the worst pipeline stage."""
        local = self.sharded // tp + (self.params - self.sharded)
        if self.stage == "layers" and pp > 1:
            return local * math.ceil(num_layers / pp) // num_layers
        return local


def _part(name: str, modules: list[nn.Module], stage: str = "all", trainable: bool = True,
          skip: tuple[nn.Parameter, ...] = ()) -> Part:
    """A Part from modules (parameters shared between them, or listed in `skip`, counted once)."""
    seen = {id(p) for p in skip}
    params = sharded = largest = 0
    for module in modules:
        dims = partition_dims(module)
        for sub in module.modules():
            largest = max(largest, sum(p.numel() for p in sub.parameters(recurse=False)))
        for key, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            params += p.numel()
            sharded += p.numel() if dims.get(key) is not None else 0
    return Part(name, params, sharded, largest, stage, trainable)


def backbone_parts(lm: nn.Module, stage_layers: bool = True) -> list[Part]:
    """Parts of a Qwen2ForCausalLM; a tied lm_head is the embedding, counted once."""
    model = lm.backbone
    tied = lm.lm_head.weight is model.embed_tokens.weight
    parts = [_part("embedding", [model.embed_tokens], "first"),
             _part("decoder layers", list(model.layers), "layers" if stage_layers else "all"),
             _part("final norm", [model.norm], "last")]
    if not tied:
        parts.append(_part("lm_head", [lm.lm_head], "last"))
    return parts


def build_meta_models(cfg: Config, command: str) -> dict[str, nn.Module]:
    """The trainable modules `command` builds, on the meta device, tp=1."""
    with torch.device("meta"):
        if command == "train-lm":
            from megadual.models.qwen2.model import build_qwen2

            return {"lm": build_qwen2(cfg.backbone)}
        if command == "train":
            from megadual.models.mllm import DualTokenMLLM

            return {"mllm": DualTokenMLLM(cfg.backbone, cfg.mllm)}
        from megadual.models.vision.discriminator import PatchDiscriminator
        from megadual.models.vision.tokenizer import DualTokenizer

        d = cfg.tokenizer.discriminator
        return {"tokenizer": DualTokenizer(cfg.tokenizer), "discriminator": PatchDiscriminator(d.base_channels, d.num_layers)}


def count_parts(cfg: Config, command: str, models: dict[str, nn.Module]) -> list[Part]:
    """Every part of `models` (from build_meta_models) with its placement."""
    if command == "train-lm":
        return backbone_parts(models["lm"])
    if command == "train":
        mllm = models["mllm"]
        return [*backbone_parts(mllm.lm), _part("visual embedding", [mllm.visual_embed], "first"),
                _part("pixel depth head", [mllm.pixel_head], "last"),
                _part("semantic depth head", [mllm.semantic_head], "last")]
    tok = models["tokenizer"]
    branches = [m for m in (getattr(tok, "pixel_branch", None), tok.semantic_branch, getattr(tok, "joint_rq", None))
                if m is not None]  # the design's projections and quantizers
    parts = [_part("tower", [tok.tower]), _part("quantized branches", branches), _part("pixel decoder", [tok.decoder]),
             _part("discriminator", [models["discriminator"]])]
    if cfg.tokenizer.loss.semantic_weight > 0:  # the frozen initial tower the semantic loss distils
        parts.append(Part("semantic teacher (frozen)", parts[0].params, 0, parts[0].largest_module, trainable=False))
    return parts
