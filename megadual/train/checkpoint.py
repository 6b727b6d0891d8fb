"""Reading trained weights back out of a DeepSpeed run directory.

Layout: <run>/checkpoints/step_000123/ as DeepSpeed writes it, and <run>/checkpoints/latest
naming the newest complete tag (DeepSpeed updates it only after every rank has written).
Whole-model weights are read here for the layouts that store them whole (tp = pp = 1);
ZeRO-3 partitions are consolidated with DeepSpeed's own `zero_to_fp32`.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch

CHECKPOINTS = "checkpoints"


def checkpoint_tag_dir(run_dir: str, tag: Optional[str] = None) -> str:
    """The directory of checkpoint `tag`, default the newest complete one."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint ({latest} is missing)")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    path = os.path.join(root, tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints `<run>/checkpoints/step_N/` holds, in increasing order."""
    names = glob.glob(os.path.join(run_dir, CHECKPOINTS, "step_*"))
    return sorted(int(os.path.basename(n).removeprefix("step_")) for n in names if os.path.isdir(n))


def load_model_state(run_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Full fp32 model state dict of a tp = pp = 1 checkpoint (any ZeRO stage).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint is split by tensor or pipeline parallelism.
    """
    path = checkpoint_tag_dir(run_dir, tag)
    if glob.glob(os.path.join(path, "layer_*-model_states.pt")) or glob.glob(os.path.join(path, "mp_rank_01*")):
        raise ValueError(
            f"{path} holds a tensor- or pipeline-parallel checkpoint; merge its shards and stages with "
            f"`megadual convert to-hf --src {run_dir} --out DIR` and use DIR instead"
        )
    if glob.glob(os.path.join(path, "zero_pp_rank_*_mp_rank_00_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    states = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}
