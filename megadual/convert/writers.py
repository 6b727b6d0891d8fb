"""Write converted tensors: a Hugging Face Qwen2 directory, or a MegaDual init checkpoint.

Both writers build the output in a temporary sibling directory and rename it into place
at the end, so an interrupted conversion never leaves a half-written output, and an
existing output is replaced only when asked.

The MegaDual init checkpoint format is described in megadual/train/init_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2.hf_adapter import config_to_hf, to_hf_key

from megadual.train.init_checkpoint import INIT_FORMAT, INIT_META, INIT_VERSION

from .sharding import StateDict


@contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary directory that becomes `out_dir` only if the block completes."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_size(text: str) -> int:
    """'5GB' / '200MB' / '64KB' / '1000' -> bytes."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


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
    with atomic_output_dir(out_dir, overwrite) as tmp:
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, parts, weight_map, total = 0, [], {}, 0

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"part-{len(parts):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                parts.append((name, list(shard)))
                shard, shard_bytes = {}, 0

        saved_dtype = None
        for name, tensor in tensors:
            hf_name = to_hf_key(name)
            if hf_name is None:
                raise ValueError(f"{name!r} has no Hugging Face Qwen2 counterpart")
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
            saved_dtype = saved_dtype or tensor.dtype
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[hf_name] = tensor.contiguous()
            shard_bytes += size
            total += size
        flush()

        final_names = []
        if len(parts) == 1:
            os.replace(os.path.join(tmp, parts[0][0]), os.path.join(tmp, "model.safetensors"))
            final_names = ["model.safetensors"]
        else:
            for i, (name, keys) in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
                final_names.append(final)
                weight_map.update({k: final for k in keys})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

        hf_config = config_to_hf(cfg)
        hf_config["torch_dtype"] = str(saved_dtype or torch.float32).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        for file_name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, file_name))
    return final_names


def write_init_checkpoint(
    rank_states: list[StateDict],
    cfg: BackboneConfig,
    out_dir: str,
    trainer_state: Optional[dict[str, Any]] = None,
    source: str = "",
    overwrite: bool = False,
) -> None:
    """A MegaDual init checkpoint from per-tensor-parallel-rank state dicts (see module doc).

    Args:
        trainer_state: {"step": ..., "loader": ...} to continue a run (reshard); None to start one.
    """
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for rank, state in enumerate(rank_states):
            tensors = {name: t.contiguous() for name, t in state.items()}
            # safetensors refuses tensors that share memory (a tied head): store the head only
            # when it is a separate weight; readers re-tie from the config.
            if cfg.tie_embeddings:
                tensors.pop("lm_head.weight", None)
            save_file(tensors, os.path.join(tmp, f"tp{rank:02d}.safetensors"), metadata={"format": "pt"})
        meta = {
            "format": INIT_FORMAT,
            "version": INIT_VERSION,
            "tp": len(rank_states),
            "backbone": asdict(cfg),
            "source": source,
            "trainer_state": trainer_state,
        }
        with open(os.path.join(tmp, INIT_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
