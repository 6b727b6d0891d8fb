"""The DeepSpeed JSON, generated from MegaDual's config in this one place.

Everything DeepSpeed needs comes from our sections (batch sizes from `train` and the data-
parallel degree, clipping and AdamW from `optim`, ZeRO from `parallel`, precision from
`train.dtype`); keys under `deepspeed:` in the YAML are merged in last, so a user can reach
any DeepSpeed option we do not model.
"""

from __future__ import annotations

import copy
from typing import Any

from megadual.config.schema import Config

from .topology import Layout

# DeepSpeed prints a line every `steps_per_print` steps; MegaDual logs its own metrics.
_QUIET = 10**9


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in recursively (extra wins); neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed config dict for `deepspeed.initialize`.

    The optimizer is torch's AdamW (`torch_adam`): DeepSpeed's FusedAdam / CPUAdam would be
    JIT-compiled on first use. Gradient clipping is always written out because DeepSpeed's
    default is 1.0, not off.
    """
    cfg.require("train", command="deepspeed training")
    train, optim = cfg.train, cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * layout.dp,
        "gradient_clipping": float(optim.grad_clip),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": train.dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.zero_stage == 3:
        # Save consolidated 16-bit weights alongside the partitions, for inference exports.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return deep_merge(ds, cfg.deepspeed)
