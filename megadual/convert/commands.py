"""`megadual convert to-hf | from-hf | reshard`: the conversions, on one CPU process.

Sources: a training run directory (DeepSpeed checkpoints of any layout, with its
config.yaml) or a MegaDual init checkpoint (from-hf / reshard output). A `megadual train-lm`
run becomes a plain Qwen2 directory; a `megadual train` run (unified model) becomes an export
directory with its tokenizers (layout: megadual/models/mllm_export.py). Every output is
written into a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

from megadual.models.hf_directory import TEXT_TOKENIZER_FILES, parse_size
from megadual.models.mllm_export import (
    TEXT_TOKENIZER_DIR,
    VISUAL_TOKENIZER_DIR,
    export_tensors,
    is_mllm_export,
    open_mllm_export,
    write_mllm_export,
)
from megadual.models.mllm_export import model_name as export_model_name
from megadual.models.qwen2 import config_from_hf
from megadual.models.qwen2.hf_adapter import from_hf_key, iter_hf_tensors, read_hf_config, to_hf_key
from megadual.train.init_checkpoint import is_init_checkpoint, open_init_checkpoint

from .sharding import StateDict, merge_tensor_parallel, partition_dims, split_tensor_parallel
from .training_checkpoint import (
    CheckpointModel,
    TensorSource,
    check_against_config,
    open_training_checkpoint,
    training_checkpoint_source,
)
from .writers import write_hf_backbone, write_init_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _LazyRankFile:
    """name -> tensor of one init-checkpoint rank file, read on access.

    The file is opened per tensor: a handle kept open keeps every page it has read mapped,
    and the process would end up holding the whole checkpoint.
    """

    def __init__(self, path: str):
        self._path = path
        with safe_open(path, framework="pt") as f:
            self._keys = list(f.keys())

    def keys(self):
        return self._keys

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._path, framework="pt") as f:
            return f.get_tensor(name)


def _dims(model: CheckpointModel) -> dict[str, Optional[int]]:
    return partition_dims(model.build_meta())


def load_source(src: str, tag: Optional[str] = None) -> TensorSource:
    """The tensors of a training run's checkpoint or of an init checkpoint, merged on request.

    Raises:
        ValueError: `src` is neither, or its tensors do not match its config.
        FileNotFoundError: `src` or one of its shards is missing.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist")
    if is_init_checkpoint(src):
        ckpt = open_init_checkpoint(src)
        ranks = [_LazyRankFile(ckpt.rank_file(r)) for r in range(ckpt.tp)]
        model = CheckpointModel(ckpt.backbone, ckpt.mllm)
        return TensorSource(model, ranks, ckpt.trainer_state, f"init checkpoint {src} ({model.describe()}, tp={ckpt.tp})")
    ckpt = open_training_checkpoint(src, tag)
    return training_checkpoint_source(ckpt, _client_state(ckpt.path))


def _client_state(tag_dir: str) -> Optional[dict[str, Any]]:
    """The trainer position (step, loader) saved with a DeepSpeed checkpoint, if any."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt"))):
        if os.path.basename(path).startswith("layer_"):
            continue
        states = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if "step" in states and "loader" in states:
            return {"step": int(states["step"]), "loader": states["loader"]}
    return None


def to_hf(src: str, out: str, tag: Optional[str] = None, max_shard_size: str = "5GB", dtype: Optional[str] = None,
          dry_run: bool = False, overwrite: bool = False, visual_tokenizer: Optional[str] = None,
          text_tokenizer: Optional[str] = None) -> list[str]:
    """Write `src` as a Hugging Face directory; returns the files (or, dry run, the plan).

    A backbone checkpoint becomes a plain Qwen2 directory (with any text tokenizer files
    found in `src`); a unified-model run becomes an export (megadual/models/mllm_export.py)
    with the run's tokenizers, unless `visual_tokenizer` / `text_tokenizer` name others
    (a DualTokenizer directory; "bytes" or a Hugging Face tokenizer directory).
    """
    source = load_source(src, tag)
    torch_dtype = DTYPES[dtype] if dtype else None
    mllm = source.model.mllm
    if mllm is None and (visual_tokenizer or text_tokenizer):
        raise ValueError(f"{source.description} holds a backbone only: --visual-tokenizer / --text-tokenizer "
                         "apply to unified-model (megadual train) runs")
    if mllm is not None:
        visual = _existing_dir(visual_tokenizer or mllm.tokenizer_path, "--visual-tokenizer", "mllm.tokenizer_path")
        text = text_tokenizer or mllm.text_tokenizer
        if visual is None:
            logger.warning("%s names no visual tokenizer (mllm.tokenizer_path): the export cannot generate or "
                           "caption until one is given (--visual-tokenizer DIR)", source.description)
    if dry_run:
        plan = _plan_hf(source, out, parse_size(max_shard_size), torch_dtype)
        if mllm is not None:
            plan.append(f"{out}/{VISUAL_TOKENIZER_DIR}/ <- {visual}" if visual else "no visual tokenizer")
            plan.append(f"{out}/{TEXT_TOKENIZER_DIR}/ <- {text}" if text != "bytes" else "text tokenizer: bytes (no files)")
        return plan
    # delay: no bar for conversions (or failures) that take under a second.
    items = tqdm(source.items(), total=len(source.names()), desc="to-hf", unit="tensor", leave=False, delay=1.0)
    if mllm is not None:
        files = write_mllm_export(items, source.backbone, mllm, out, visual, text,
                                  parse_size(max_shard_size), torch_dtype, overwrite, source.description)
    else:
        extra = {f: os.path.join(src, f) for f in TEXT_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))}
        files = write_hf_backbone(items, source.backbone, out, parse_size(max_shard_size), torch_dtype, overwrite, extra)
        files = files + ["config.json", *extra]
    logger.info("wrote %s from %s", out, source.description)
    return files


def _existing_dir(path: Optional[str], option: str, key: str) -> Optional[str]:
    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(f"visual tokenizer directory {path!r} does not exist; pass {option} DIR "
                                f"(the run's {key} is resolved against the current directory)")
    return path


def _plan_hf(source: TensorSource, out: str, max_shard_bytes: int, dtype: Optional[torch.dtype]) -> list[str]:
    if source.model.mllm is not None:
        named = export_tensors(source.items(), source.backbone)
    else:
        named = ((to_hf_key(n), t) for n, t in source.items())  # a tied head is not among the items
    lines, shard, shard_bytes = [f"{out}/config.json"], 1, 0
    for hf_name, tensor in named:
        size = tensor.numel() * (torch.empty((), dtype=dtype).element_size() if dtype else tensor.element_size())
        if shard_bytes and shard_bytes + size > max_shard_bytes:
            shard, shard_bytes = shard + 1, 0
        shard_bytes += size
        lines.append(f"{out}/shard {shard}: {hf_name} {tuple(tensor.shape)}")
    return lines


def from_hf(hf_dir: str, out: str, tp: int, overwrite: bool = False) -> None:
    """A MegaDual init checkpoint for `tp` tensor-parallel ranks from a HF Qwen2/Qwen2.5
    directory (the backbone) or from a unified-model export (every part of the model).

    Tensors keep their dtype, so HF -> MegaDual -> HF is bit-identical. Any pipeline degree
    can start from the result.
    """
    if is_mllm_export(hf_dir):
        export = open_mllm_export(hf_dir)
        model, our_name = CheckpointModel(export.backbone, export.mllm), export_model_name
    else:
        model, our_name = CheckpointModel(config_from_hf(read_hf_config(hf_dir))), from_hf_key
    dims = _dims(model)
    shards: list[StateDict] = [{} for _ in range(tp)]
    for hf_name, tensor in tqdm(iter_hf_tensors(hf_dir), desc="from-hf", unit="tensor", leave=False, delay=1.0):
        name = our_name(hf_name)
        if name is None or name == model.tied_head:
            continue
        for rank, part in enumerate(split_tensor_parallel({name: tensor}, dims, tp)):
            shards[rank].update(part)
    full_check = dict(shards[0]) if tp == 1 else merge_tensor_parallel(shards, dims)
    if model.tied_head is not None:
        full_check[model.tied_head] = full_check[model.embedding]
    check_against_config(full_check, model, where=hf_dir)
    write_init_checkpoint(shards, model.backbone, out, source=os.path.abspath(hf_dir), overwrite=overwrite,
                          mllm=model.mllm)


def reshard(src: str, out: str, tp: int, tag: Optional[str] = None, overwrite: bool = False) -> None:
    """Rewrite `src` (backbone or unified model) for `tp` tensor-parallel ranks (any pipeline
    degree), keeping the trainer's position so training continues at the same step; optimizer
    moments are not carried over."""
    source = load_source(src, tag)
    shards = split_tensor_parallel(source.state_dict(), _dims(source.model), tp)
    write_init_checkpoint(shards, source.backbone, out, trainer_state=source.trainer_state,
                          source=source.description, overwrite=overwrite, mllm=source.model.mllm)


def main(args) -> int:
    """`megadual convert ...` handler."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "to-hf":
        files = to_hf(args.src, args.out, args.tag, args.max_shard_size, args.dtype, args.dry_run, args.overwrite,
                      args.visual_tokenizer, args.text_tokenizer)
        print("\n".join(files))
    elif args.action == "from-hf":
        from_hf(args.hf, args.out, args.tp, args.overwrite)
        print(f"wrote {args.out} (tp={args.tp})")
    else:
        reshard(args.src, args.out, args.tp, args.tag, args.overwrite)
        print(f"wrote {args.out} (tp={args.tp})")
    return 0
