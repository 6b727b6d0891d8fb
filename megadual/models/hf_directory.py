"""Writing Hugging Face-style weight directories: streamed safetensors shards plus an index,
built in a temporary directory that is renamed into place only when complete
(`megadual.fs.atomic_output_dir`).

Shared by every writer of such a directory (the backbone's `megadual convert to-hf`, the
unified model's export and `DualTokenMLLM.save_pretrained`), so they shard, name and index
their files the same way. Reading goes through `qwen2.hf_adapter.iter_hf_tensors`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# A Hugging Face text tokenizer's files (what AutoTokenizer reads), copied next to converted weights.
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json", "generation_config.json")


def parse_size(text: str) -> int:
    """'5GB' / '200MB' / '64KB' / '1000' -> bytes."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


def write_safetensors_shards(tensors: Iterable[tuple[str, torch.Tensor]], directory: str,
                             max_shard_bytes: int = 5 * 10**9,
                             dtype: Optional[torch.dtype] = None) -> tuple[list[str], Optional[torch.dtype]]:
    """Write (file name, tensor) pairs as transformers lays out weights.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json`. A shard is
    written as soon as the next tensor would overflow it, so memory holds one shard plus one
    tensor. Call inside `atomic_output_dir`: shards are written before the index.

    Args:
        tensors: (name in the file, tensor), streamed; names must be unique.
        dtype: cast every tensor to it (default: keep each tensor's own).

    Returns:
        (the safetensors file names written, the dtype of the first tensor written).
    """
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, parts, total = 0, [], 0
    saved_dtype, seen = None, set()

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(parts):05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            parts.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is written twice")
        seen.add(name)
        tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        saved_dtype = saved_dtype or tensor.dtype
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    flush()

    if len(parts) <= 1:
        if parts:
            os.replace(os.path.join(directory, parts[0][0]), os.path.join(directory, SINGLE_WEIGHTS))
        else:  # nothing to write still gives a loadable (empty) file
            save_file({}, os.path.join(directory, SINGLE_WEIGHTS), metadata={"format": "pt"})
        return [SINGLE_WEIGHTS], saved_dtype
    final_names, weight_map = [], {}
    for i, (name, keys) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(directory, name), os.path.join(directory, final))
        final_names.append(final)
        weight_map.update({k: final for k in keys})
    with open(os.path.join(directory, WEIGHTS_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return final_names, saved_dtype


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """config.json's `torch_dtype` value ("float32", "bfloat16", ...)."""
    return str(dtype or torch.float32).removeprefix("torch.")
