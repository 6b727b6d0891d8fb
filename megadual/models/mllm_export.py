"""The unified model as a Hugging Face-style directory (the "export"): its layout, names and
config, written by `megadual convert to-hf` (stage-2 runs) and `DualTokenMLLM.save_pretrained`,
read by `DualTokenMLLM.from_pretrained` and `megadual generate` / `caption`.

Layout of an export directory:

    config.json          transformers' Qwen2 config of the backbone, plus a "megadual" section:
                         {"format": "megadual-mllm", "version": 1, "backbone": {...}, "mllm": {...},
                          "source": "..."}, the two config sections that rebuild the model
    model.safetensors    every tensor of DualTokenMLLM; above the shard size
                         model-0000i-of-0000n.safetensors + model.safetensors.index.json.
                         Backbone tensors under their HF Qwen2 names (qwen2/hf_adapter.py);
                         all others under "megadual." + the MegaDual name, e.g.
                         megadual.visual_embed.pixel.codebook, megadual.pixel_head.blocks.0.qkv.weight
    visual_tokenizer/    the DualToken tokenizer (`DualTokenizer.save_pretrained`: config.json +
                         model.safetensors); absent when the run named none
    text_tokenizer/      the text tokenizer's files (tokenizer.json, tokenizer_config.json, ...)
                         when it is a Hugging Face tokenizer; absent for the byte tokenizer.
                         A directory of its own: next to the Qwen2 config.json, transformers'
                         AutoTokenizer would pick the tokenizer class from config.json's model_type

`transformers.Qwen2ForCausalLM.from_pretrained(dir)` loads the backbone and reports the
megadual.* tensors as unexpected (a load report, not an error); `load_hf(dir)` skips them.
In the stored mllm section `tokenizer_path` and `text_tokenizer` are relative to the
directory ("visual_tokenizer"; "text_tokenizer" or "bytes"); reading resolves them,
so the directory can be moved. `code_init` is stored as "learned": the trained code tables
are in the weights, nothing is copied from the tokenizer again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch

from megadual.config.errors import ConfigError
from megadual.config.loader import section_from_dict
from megadual.config.schema import BackboneConfig, MLLMConfig
from megadual.fs import atomic_output_dir

from .hf_directory import (
    TEXT_TOKENIZER_FILES,
    WEIGHTS_INDEX,
    dtype_name,
    write_safetensors_shards,
)
from .qwen2.hf_adapter import config_to_hf, from_hf_key, read_hf_config, read_hf_state, to_hf_key

if TYPE_CHECKING:
    from .mllm import DualTokenMLLM

EXPORT_FORMAT = "megadual-mllm"
EXPORT_VERSION = 1
SECTION = "megadual"  # the config.json key of MegaDual's own settings
EXTRA_PREFIX = "megadual."  # file names of the tensors transformers' Qwen2 has no place for
BACKBONE_PREFIX = "lm."  # where DualTokenMLLM keeps its Qwen2ForCausalLM
VISUAL_TOKENIZER_DIR = "visual_tokenizer"
BYTES_TOKENIZER = "bytes"  # megadual.data.text_tokenizers.BYTES (models may not import data)
TEXT_TOKENIZER_DIR = "text_tokenizer"


# ------------------------------------------------------------------------------------ names


def export_name(name: str) -> str:
    """File name of `DualTokenMLLM` state-dict tensor `name`: the HF Qwen2 name for the backbone,
    "megadual." + `name` for everything else."""
    if name.startswith(BACKBONE_PREFIX):
        hf_name = to_hf_key(name.removeprefix(BACKBONE_PREFIX))
        if hf_name is None:
            raise ValueError(f"backbone tensor {name!r} has no Hugging Face Qwen2 name")
        return hf_name
    return EXTRA_PREFIX + name


def model_name(file_name: str) -> Optional[str]:
    """`DualTokenMLLM` name of a tensor in an export, or None for a name that is neither."""
    if file_name.startswith(EXTRA_PREFIX):
        return file_name.removeprefix(EXTRA_PREFIX)
    name = from_hf_key(file_name)
    return None if name is None else BACKBONE_PREFIX + name


def tied_head_name(backbone: BackboneConfig) -> Optional[str]:
    """The state-dict name that is the embedding itself when the head is tied (never stored)."""
    return f"{BACKBONE_PREFIX}lm_head.weight" if backbone.tie_embeddings else None


def export_tensors(tensors: Iterable[tuple[str, torch.Tensor]],
                   backbone: BackboneConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(MegaDual name, tensor) -> (export name, tensor), leaving out a tied head."""
    tied = tied_head_name(backbone)
    for name, tensor in tensors:
        if name != tied:
            yield export_name(name), tensor


# ------------------------------------------------------------------------------------ config


@dataclass
class MLLMExport:
    """An opened export directory.

    Attributes:
        path: the directory.
        backbone, mllm: the config sections; `mllm.tokenizer_path` (None when the export has no
            visual tokenizer) and `mllm.text_tokenizer` ("bytes" or a directory) are absolute.
        source: what the export was made from.
    """

    path: str
    backbone: BackboneConfig
    mllm: MLLMConfig
    source: str


def is_mllm_export(path: str) -> bool:
    """Whether `path` holds a config.json with a MegaDual unified-model section."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as f:
        return SECTION in json.load(f)


def open_mllm_export(path: str) -> MLLMExport:
    """Read and check an export's config.json.

    Raises:
        FileNotFoundError: no such directory, or no config.json.
        ValueError: a config.json without a MegaDual section (e.g. a plain Qwen2 directory),
            another format version, or invalid config sections (ConfigError names the key).
    """
    hf_config = read_hf_config(path)
    section = hf_config.get(SECTION)
    if section is None:
        raise ValueError(
            f"{path}/config.json has no {SECTION!r} section: not a MegaDual unified-model export. A plain "
            "Qwen2 directory loads with megadual.models.qwen2.load_hf; a stage-2 run becomes an export with "
            "`megadual convert to-hf --src RUN --out DIR`"
        )
    if section.get("format") != EXPORT_FORMAT or section.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"{path}/config.json: {SECTION}.format {section.get('format')!r} version {section.get('version')!r}; "
            f"this MegaDual reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}"
        )
    backbone = section_from_dict(BackboneConfig, section["backbone"], f"{SECTION}.backbone")
    mllm = section_from_dict(MLLMConfig, section["mllm"], f"{SECTION}.mllm")
    mllm.validate_with_backbone(backbone, f"{SECTION}.mllm")
    root = os.path.abspath(path)
    mllm = dataclasses.replace(
        mllm,
        tokenizer_path=None if mllm.tokenizer_path is None else os.path.join(root, mllm.tokenizer_path),
        text_tokenizer=mllm.text_tokenizer if mllm.text_tokenizer == BYTES_TOKENIZER
        else os.path.join(root, mllm.text_tokenizer),
    )
    return MLLMExport(path=root, backbone=backbone, mllm=mllm, source=section.get("source", ""))


def export_config(backbone: BackboneConfig, mllm: MLLMConfig, has_visual_tokenizer: bool, text_tokenizer: str,
                  dtype: Optional[torch.dtype], source: str) -> dict:
    """config.json of an export: the Qwen2 config plus the MegaDual section (paths made relative)."""
    stored_mllm = dataclasses.replace(
        mllm,
        tokenizer_path=VISUAL_TOKENIZER_DIR if has_visual_tokenizer else None,
        text_tokenizer=BYTES_TOKENIZER if text_tokenizer == BYTES_TOKENIZER else TEXT_TOKENIZER_DIR,
        code_init="learned",
    )
    config = config_to_hf(backbone)
    config["torch_dtype"] = dtype_name(dtype)
    config[SECTION] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "backbone": dataclasses.asdict(dataclasses.replace(backbone, hf_path=None)),
        "mllm": dataclasses.asdict(stored_mllm),
        "source": source,
    }
    return config


# ------------------------------------------------------------------------------------ tokenizers


def check_visual_tokenizer(path: str, mllm: MLLMConfig) -> None:
    """Raise unless `path` is a DualTokenizer directory whose codes fit the mllm section.

    Reads the tokenizer's config.json only (no weights, no SigLIP).

    Raises:
        FileNotFoundError: the directory, its config.json or its weights are missing.
        ConfigError: a codebook size, depth or grid that differs from the mllm section's.
    """
    from .vision.tokenizer import CONFIG_NAME, FORMAT, WEIGHTS_NAME

    from megadual.config.schema import TokenizerConfig

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"visual tokenizer {path}: {name} is missing (expected a DualTokenizer.save_pretrained directory)"
            )
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}/{CONFIG_NAME}: format {config.get('format')!r}, expected a DualToken tokenizer ({FORMAT!r})")
    tok = section_from_dict(TokenizerConfig, config["tokenizer"], "tokenizer")
    expected = {
        "mllm.pixel_codebook_size": (mllm.pixel_codebook_size, tok.pixel_quantizer.codebook_size),
        "mllm.semantic_codebook_size": (mllm.semantic_codebook_size, tok.semantic_quantizer.codebook_size),
        "mllm.depth": (mllm.depth, tok.pixel_quantizer.depth),
        "mllm.num_positions": (mllm.num_positions, tok.tower.grid_size**2),
    }
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ConfigError(key, ours, f"{theirs}, as in the visual tokenizer at {path}")


def text_tokenizer_files(path: str) -> list[str]:
    """The Hugging Face tokenizer files in directory `path`.

    Raises:
        FileNotFoundError: no such directory, or no tokenizer file in it.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text tokenizer directory {path!r} does not exist (mllm.text_tokenizer)")
    files = [f for f in TEXT_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not any(f.startswith("tokenizer") or f in ("vocab.json", "merges.txt") for f in files):
        raise FileNotFoundError(
            f"text tokenizer directory {path!r} holds none of {', '.join(TEXT_TOKENIZER_FILES[:6])}; "
            "mllm.text_tokenizer must be 'bytes' or a Hugging Face tokenizer directory"
        )
    return files


# ------------------------------------------------------------------------------------ write / read


def write_mllm_export(
    tensors: Iterable[tuple[str, torch.Tensor]],
    backbone: BackboneConfig,
    mllm: MLLMConfig,
    out_dir: str,
    visual_tokenizer: Optional[str] = None,
    text_tokenizer: str = BYTES_TOKENIZER,
    max_shard_bytes: int = 5 * 10**9,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    source: str = "",
) -> list[str]:
    """Write an export directory (module docstring) from streamed tensors, atomically.

    Args:
        tensors: (DualTokenMLLM state-dict name, full tensor) pairs, e.g. `model.state_dict().items()`
            or a converted checkpoint's stream; a tied head may be included (it is left out).
        visual_tokenizer: a DualTokenizer directory to copy in (checked against `mllm`), or None.
        text_tokenizer: "bytes", or a Hugging Face tokenizer directory whose tokenizer files are
            copied to text_tokenizer/ (not its weights, when it is a whole model directory).
        dtype: cast the weights (default: keep each tensor's dtype).
        source: recorded in config.json (what was converted).

    Returns:
        The files written, relative to `out_dir`.

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
        FileNotFoundError / ConfigError: a tokenizer is missing or does not fit `mllm`.
    """
    # Check the tokenizers before writing gigabytes of weights.
    if visual_tokenizer is not None:
        check_visual_tokenizer(visual_tokenizer, mllm)
    text_files = [] if text_tokenizer == BYTES_TOKENIZER else text_tokenizer_files(text_tokenizer)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        weights, saved_dtype = write_safetensors_shards(export_tensors(tensors, backbone), tmp, max_shard_bytes, dtype)
        files = list(weights) + ([WEIGHTS_INDEX] if os.path.isfile(os.path.join(tmp, WEIGHTS_INDEX)) else [])
        if visual_tokenizer is not None:
            shutil.copytree(visual_tokenizer, os.path.join(tmp, VISUAL_TOKENIZER_DIR))
            files += [f"{VISUAL_TOKENIZER_DIR}/{f}" for f in sorted(os.listdir(os.path.join(tmp, VISUAL_TOKENIZER_DIR)))]
        if text_files:
            os.makedirs(os.path.join(tmp, TEXT_TOKENIZER_DIR))
        for name in text_files:
            shutil.copyfile(os.path.join(text_tokenizer, name), os.path.join(tmp, TEXT_TOKENIZER_DIR, name))
        files += [f"{TEXT_TOKENIZER_DIR}/{name}" for name in text_files]
        config = export_config(backbone, mllm, visual_tokenizer is not None, text_tokenizer, saved_dtype, source)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return [*files, "config.json"]


def load_mllm_export(path: str, dtype: Optional[torch.dtype] = torch.float32,
                     device: str | torch.device = "cpu") -> "DualTokenMLLM":
    """Build the unified model from an export directory (eval mode, tp = 1).

    Args:
        dtype: parameter dtype (None: as stored).

    Raises:
        FileNotFoundError: no directory / config.json / weights, or a shard the index names is missing.
        ValueError: not an export, or weights that do not fit its config (names the tensor).
    """
    from .mllm import DualTokenMLLM

    export = open_mllm_export(path)
    # Build without allocating or initialising: every tensor is then assigned from the files.
    with torch.device("meta"):
        model = DualTokenMLLM(export.backbone, export.mllm)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tied = tied_head_name(export.backbone)
    expected.pop(tied, None)

    def ours(file_name: str) -> Optional[str]:
        name = model_name(file_name)
        if name is None:
            raise ValueError(f"{path}: tensor {file_name!r} is neither a Qwen2 nor a {EXTRA_PREFIX}* tensor")
        return None if name == tied else name  # a tied head is the embedding; a stored copy is ignored

    description = f"the unified model of {path}/config.json"
    state = read_hf_state(path, expected, ours, export_name, description, dtype, device)
    if tied is not None:
        state[tied] = state[f"{BACKBONE_PREFIX}backbone.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm.tie_weights()  # assign=True replaced the shared Parameter with two objects
    return model.eval()
