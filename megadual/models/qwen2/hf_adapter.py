"""Hugging Face Qwen2 <-> MegaDual backbone: the one place that knows HF's names.

Every converter (load_hf here, the checkpoint tools later) goes through `to_hf_key`,
`from_hf_key`, `config_from_hf` and `config_to_hf`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from typing import Any, Callable, Iterator, Optional

import torch

from megadual.config.schema import BackboneConfig

from .model import Qwen2ForCausalLM

HF_ARCHITECTURE = "Qwen2ForCausalLM"
HF_MODEL_TYPE = "qwen2"

# (HF name pattern, MegaDual name pattern); {i} is the layer index.
_LAYER_KEYS = [
    ("model.layers.{i}.input_layernorm.weight", "backbone.layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "backbone.layers.{i}.mlp_norm.weight"),
    *[
        (f"model.layers.{{i}}.self_attn.{p}.{w}", f"backbone.layers.{{i}}.attn.{p}.{w}")
        for p in ("q_proj", "k_proj", "v_proj")
        for w in ("weight", "bias")
    ],
    ("model.layers.{i}.self_attn.o_proj.weight", "backbone.layers.{i}.attn.o_proj.weight"),
    *[(f"model.layers.{{i}}.mlp.{p}.weight", f"backbone.layers.{{i}}.mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")],
]
_GLOBAL_KEYS = [
    ("model.embed_tokens.weight", "backbone.embed_tokens.weight"),
    ("model.norm.weight", "backbone.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _compile(pairs: list[tuple[str, str]], src: int) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for pair in pairs:
        pattern = re.escape(pair[src]).replace(re.escape("{i}"), r"(\d+)")
        compiled.append((re.compile(f"^{pattern}$"), pair[1 - src]))
    return compiled


_HF_TO_OURS = _compile(_LAYER_KEYS + _GLOBAL_KEYS, 0)
_OURS_TO_HF = _compile(_LAYER_KEYS + _GLOBAL_KEYS, 1)


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, target in table:
        match = pattern.match(name)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    return None


def from_hf_key(hf_name: str) -> Optional[str]:
    """MegaDual parameter name for a HF Qwen2 tensor name, or None if it has no counterpart."""
    return _translate(hf_name, _HF_TO_OURS)


def to_hf_key(name: str) -> Optional[str]:
    """HF Qwen2 tensor name for a MegaDual backbone parameter name, or None."""
    return _translate(name, _OURS_TO_HF)


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> BackboneConfig:
    """Build the backbone section from a HF Qwen2 `config.json` dict.

    Raises:
        ValueError: another architecture, or a Qwen2 feature MegaDual does not implement
            (sliding-window attention, scaled RoPE, an activation other than SiLU).
    """
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type != HF_MODEL_TYPE:
        raise ValueError(
            f"config.json describes model_type={model_type!r} (architectures={architectures}); "
            f"load_hf reads only Qwen2/Qwen2.5 checkpoints (model_type '{HF_MODEL_TYPE}')"
        )
    if hf_config.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true; sliding-window attention is not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json sets hidden_act={hf_config['hidden_act']!r}; only 'silu' is supported")
    # transformers 5 nests RoPE settings in `rope_parameters`; 4.x had `rope_theta` / `rope_scaling`.
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json uses RoPE scaling {rope_type!r}; only default RoPE is supported")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))

    num_heads = hf_config["num_attention_heads"]
    values = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )
    known = {f.name for f in fields(BackboneConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown backbone override(s) {unknown}; allowed: {sorted(known)}")
    values.update(overrides)
    cfg = BackboneConfig(**values)
    cfg.validate()
    return cfg


def config_to_hf(cfg: BackboneConfig) -> dict[str, Any]:
    """A HF `config.json` dict that transformers' Qwen2 loads into the same architecture."""
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
    }


def _weight_files(path: str) -> list[str]:
    """The checkpoint's weight files: sharded or single, safetensors or PyTorch bin."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f"{index_path} lists shard(s) missing from {path}: {missing}")
            return [os.path.join(path, s) for s in shards]
        if os.path.isfile(os.path.join(path, single_name)):
            return [os.path.join(path, single_name)]
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json + shards, "
        "or pytorch_model.bin"
    )


def iter_hf_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one at a time, so peak memory stays near one tensor."""
    for file in _weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            for name, tensor in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
                yield name, tensor


def read_hf_state(
    path: str,
    expected: dict[str, torch.Size],
    ours: Callable[[str], Optional[str]],
    theirs: Callable[[str], Optional[str]],
    model_description: str,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Every tensor of a HF-style directory under MegaDual names, checked against `expected`.

    Tensors are read one at a time (peak memory: the result plus one tensor).

    Args:
        expected: MegaDual name -> shape, exactly the tensors to return.
        ours: file tensor name -> MegaDual name, or None to skip the tensor.
        theirs: MegaDual name -> file tensor name (for messages about missing tensors).
        model_description: what the directory should hold, for messages ("a 2-layer model").
        dtype: cast to it (None: keep the stored dtype).

    Raises:
        FileNotFoundError: no weights, or a shard named by the index is missing.
        ValueError: a tensor that does not belong, a shape that differs, a tensor missing.
    """
    state: dict[str, torch.Tensor] = {}
    for file_name, tensor in iter_hf_tensors(path):
        name = ours(file_name)
        if name is None:
            continue
        if name not in expected:
            raise ValueError(f"{path}: tensor {file_name!r} does not belong to {model_description}")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(
                f"{path}: tensor {file_name!r} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name])}"
            )
        state[name] = tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: weights missing for {[theirs(m) for m in missing][:8]} ({len(missing)} in all)")
    return state


def read_hf_config(path: str) -> dict[str, Any]:
    """The parsed `config.json` of a HF model directory, with a clear error when absent."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def load_hf(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **overrides: Any
) -> Qwen2ForCausalLM:
    """Build a MegaDual Qwen2 causal LM from a local Hugging Face Qwen2/Qwen2.5 directory.

    Args:
        path: directory with config.json and model.safetensors (or sharded safetensors with an
            index, or pytorch_model.bin). Nothing is downloaded.
        dtype: parameter dtype of the returned model.
        device: where the parameters live.
        **overrides: backbone config fields to override (e.g. attn_impl="sdpa").

    Returns:
        `Qwen2ForCausalLM`; its forward returns logits [B, T, V] as a tensor.

    Raises:
        FileNotFoundError: directory, config.json or a weight shard missing.
        ValueError: not a Qwen2 config, unsupported feature, or weights that do not match it.
    """
    cfg = config_from_hf(read_hf_config(path), **overrides)
    # Build without allocating or initialising: every tensor is then assigned from the file.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")

    def ours(hf_name: str) -> Optional[str]:
        name = from_hf_key(hf_name)
        # Tied checkpoints sometimes still carry lm_head; unknown extras (e.g. rotary caches) are skipped.
        return None if name == "lm_head.weight" and cfg.tie_embeddings else name

    state = read_hf_state(path, expected, ours, to_hf_key, f"a {cfg.num_layers}-layer model", dtype, device)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two objects
    return model
