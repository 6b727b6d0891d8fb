"""Write converted tensors: a Hugging Face Qwen2 directory, or a MegaDual init checkpoint.

Both writers build the output in a temporary sibling directory and rename it into place
at the end (`megadual.fs.atomic_output_dir`), so an interrupted conversion
never leaves a half-written output, and an existing output is replaced only when asked.

The MegaDual init checkpoint format is described in megadual/train/init_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import save_file

from megadual.config.schema import BackboneConfig, MLLMConfig
from megadual.fs import atomic_output_dir
from megadual.models.hf_directory import dtype_name, write_safetensors_shards
from megadual.models.qwen2.hf_adapter import config_to_hf, to_hf_key
from megadual.train.init_checkpoint import INIT_FORMAT, INIT_META, INIT_VERSION

from .sharding import StateDict


def write_hf_backbone(
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: BackboneConfig,
    out_dir: str,
    max_shard_bytes: int = 5 * 10**9,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    extra_files: Optional[dict[str, str]] = None,
) -> list[str]:
    """A directory `transformers.Qwen2ForCausalLM.from_pretrained` loads.

    Args:
        tensors: (MegaDual name, full tensor) pairs, streamed; a shard is written as soon as
            it reaches `max_shard_bytes`, so memory stays near one shard plus one tensor.
        dtype: cast to this dtype (default: keep each tensor's own).
        extra_files: {file name: source path} copied in (e.g. text tokenizer files).

    Returns:
        The safetensors file names written.
    """
    def hf_named():
        for name, tensor in tensors:
            hf_name = to_hf_key(name)
            if hf_name is None:
                raise ValueError(f"{name!r} has no Hugging Face Qwen2 counterpart")
            if not (hf_name == "lm_head.weight" and cfg.tie_embeddings):
                yield hf_name, tensor

    with atomic_output_dir(out_dir, overwrite) as tmp:
        files, saved_dtype = write_safetensors_shards(hf_named(), tmp, max_shard_bytes, dtype)
        hf_config = config_to_hf(cfg)
        hf_config["torch_dtype"] = dtype_name(saved_dtype)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        for file_name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, file_name))
    return files


def write_init_checkpoint(
    rank_states: list[StateDict],
    cfg: BackboneConfig,
    out_dir: str,
    trainer_state: Optional[dict[str, Any]] = None,
    source: str = "",
    overwrite: bool = False,
    mllm: Optional[MLLMConfig] = None,
) -> None:
    """A MegaDual init checkpoint from per-tensor-parallel-rank state dicts (see module doc).

    Args:
        trainer_state: {"step": ..., "loader": ...} to continue a run (reshard); None to start one.
        mllm: set when the states are a whole `DualTokenMLLM`'s (names with the backbone under lm.).
    """
    head = ("lm." if mllm is not None else "") + "lm_head.weight"
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for rank, state in enumerate(rank_states):
            tensors = {name: t.contiguous() for name, t in state.items()}
            # safetensors refuses tensors that share memory (a tied head): store the head only
            # when it is a separate weight; readers re-tie from the config.
            if cfg.tie_embeddings:
                tensors.pop(head, None)
            save_file(tensors, os.path.join(tmp, f"tp{rank:02d}.safetensors"), metadata={"format": "pt"})
        meta = {
            "format": INIT_FORMAT,
            "version": INIT_VERSION,
            "tp": len(rank_states),
            "backbone": asdict(cfg),
            "mllm": None if mllm is None else asdict(mllm),
            "source": source,
            "trainer_state": trainer_state,
        }
        with open(os.path.join(tmp, INIT_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
