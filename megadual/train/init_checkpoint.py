"""MegaDual init checkpoints: weights (and optionally a trainer position) to start a run from.

Written by `megadual convert from-hf` and `megadual convert reshard`; read by the trainer
(`train.init_from`) and by `megadual convert to-hf`. Layout of the directory:

    megadual_checkpoint.json   {"format": "megadual-init", "version": 1, "tp": N,
                                "backbone": {...}, "mllm": null | {...},
                                "trainer_state": null | {"step", "loader"}}
    tp00.safetensors ...       one per tensor-parallel rank: that rank's shard of every
                               tensor, single-process names; a tied head is not stored

Without "mllm" (or null) the tensors are a `Qwen2ForCausalLM`'s (the backbone; `megadual
train-lm`, or the backbone of a stage-2 run); with it they are a whole `DualTokenMLLM`'s
(backbone under "lm.", visual embedding, depth heads), e.g. from an export of a stage-2 run.

Pipeline stages pick their own layers out of the files (safetensors reads lazily), so one
file set serves every pipeline degree; a different tensor-parallel degree needs a reshard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from safetensors import safe_open

from megadual.config.errors import ConfigError
from megadual.config.loader import section_from_dict
from megadual.config.schema import BackboneConfig, MLLMConfig
from megadual.distributed.pipeline import pipeline_to_model_name
from megadual.distributed.pipeline_mllm import mllm_pipeline_to_model_name

INIT_FORMAT = "megadual-init"
INIT_VERSION = 1
INIT_META = "megadual_checkpoint.json"
# Fields that change the tensors; the rest (attention backend, checks, hf_path) may differ.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                       "resolved_head_dim", "tie_embeddings", "qkv_bias")
# The same for the unified model's own parts (mllm section); sampling, loss and token ids may differ.
MLLM_ARCHITECTURE_FIELDS = ("pixel_codebook_size", "semantic_codebook_size", "depth", "code_embed_dim",
                            "projector_hidden", "head_layers", "head_heads", "head_mlp_ratio")


def _mllm_architecture(mllm: MLLMConfig, hidden_size: int) -> dict[str, Any]:
    """The mllm values that shape tensors, defaults resolved (head_width None = hidden_size)."""
    values = {name: getattr(mllm, name) for name in MLLM_ARCHITECTURE_FIELDS}
    values["pixel_embed_dim"] = mllm.resolved_pixel_embed_dim(hidden_size)
    values["head_width"] = mllm.resolved_head_width(hidden_size)
    return values


@dataclass
class InitCheckpoint:
    path: str
    tp: int
    backbone: BackboneConfig
    trainer_state: Optional[dict[str, Any]]
    mllm: Optional[MLLMConfig] = None  # set: the tensors are a whole DualTokenMLLM's

    def rank_file(self, tp_rank: int) -> str:
        return os.path.join(self.path, f"tp{tp_rank:02d}.safetensors")

    @property
    def prefix(self) -> str:
        """Where the causal LM's tensors sit in the stored names (DualTokenMLLM keeps it under lm.)."""
        return "lm." if self.mllm is not None else ""


def is_init_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INIT_META))


def open_init_checkpoint(path: str) -> InitCheckpoint:
    """Read and check the metadata.

    Raises:
        ValueError: not an init checkpoint, or another format version.
        FileNotFoundError: a rank file is missing.
    """
    meta_path = os.path.join(path, INIT_META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path} is not a MegaDual init checkpoint (no {INIT_META})")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != INIT_FORMAT or meta.get("version") != INIT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this MegaDual reads "
            f"{INIT_FORMAT!r} version {INIT_VERSION}"
        )
    known = {f.name for f in fields(BackboneConfig)}
    ckpt = InitCheckpoint(
        path=path,
        tp=int(meta["tp"]),
        backbone=BackboneConfig(**{k: v for k, v in meta["backbone"].items() if k in known}),
        trainer_state=meta.get("trainer_state"),
        mllm=None if meta.get("mllm") is None else section_from_dict(MLLMConfig, meta["mllm"], "mllm"),
    )
    for rank in range(ckpt.tp):
        if not os.path.isfile(ckpt.rank_file(rank)):
            raise FileNotFoundError(f"{path}: shard {os.path.basename(ckpt.rank_file(rank))} is missing")
    return ckpt


def read_rank_tensors(ckpt: InitCheckpoint, tp_rank: int, names: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `tp_rank`'s tensors (only `names` if given); a tied head re-added."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(ckpt.rank_file(tp_rank), framework="pt") as f:
        for name in f.keys():
            if names is None or name in names:
                out[name] = f.get_tensor(name)
    embedding, head = f"{ckpt.prefix}backbone.embed_tokens.weight", f"{ckpt.prefix}lm_head.weight"
    if ckpt.backbone.tie_embeddings and embedding in out and (names is None or head in names):
        out[head] = out[embedding]
    return out


def check_compatible(ckpt: InitCheckpoint, backbone: BackboneConfig, tp: int,
                     mllm: Optional[MLLMConfig] = None) -> None:
    """Raise ConfigError when the run's backbone (or, for a unified-model checkpoint, its mllm
    section) or tensor-parallel degree differs from the checkpoint's.

    Args:
        mllm: the run's mllm section; None for a backbone-only run (`train-lm`).
    """
    if ckpt.mllm is not None and mllm is None:
        raise ConfigError("train.init_from", ckpt.path, "a backbone checkpoint: this one holds a unified model "
                          "(visual embedding, depth heads); start `megadual train` from it instead")
    for name in ARCHITECTURE_FIELDS:
        if getattr(ckpt.backbone, name) != getattr(backbone, name):
            raise ConfigError(
                f"backbone.{name.removeprefix('resolved_')}",
                getattr(backbone, name),
                f"{getattr(ckpt.backbone, name)!r} as in the init checkpoint {ckpt.path}",
            )
    if ckpt.mllm is not None:
        ours, theirs = _mllm_architecture(mllm, backbone.hidden_size), _mllm_architecture(ckpt.mllm, backbone.hidden_size)
        for name, value in ours.items():
            if value != theirs[name]:
                raise ConfigError(f"mllm.{name}", value, f"{theirs[name]!r} as in the init checkpoint {ckpt.path}")
    if ckpt.tp != tp:
        raise ConfigError(
            "train.init_from",
            ckpt.path,
            f"a checkpoint written for parallel.tp={tp} (this one has tp={ckpt.tp}); reshard it with "
            f"`megadual convert reshard --src {ckpt.path} --out DIR --tp {tp}`",
        )


def pipeline_state_names(module: torch.nn.Module, num_layers: int, unified: bool = False) -> dict[str, str]:
    """{PipelineModule state-dict key: single-process name} for the layers this stage holds.

    Args:
        unified: the module is the unified model's pipeline (names of `DualTokenMLLM`), not the
            backbone's (names of `Qwen2ForCausalLM`).
    """
    to_model_name = mllm_pipeline_to_model_name if unified else pipeline_to_model_name
    mapping = {}
    for key in module.state_dict():
        if key.startswith("tied_modules.embed."):
            mapping[key] = to_model_name(0, key.removeprefix("tied_modules.embed."), num_layers)
        else:
            layer, rest = key.split(".", 1)
            mapping[key] = to_model_name(int(layer), rest, num_layers)
    return mapping
