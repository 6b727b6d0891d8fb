"""Single-process training checkpoints: written atomically, found by step.

Layout: <run>/checkpoints/step_000123/state.pt. A checkpoint directory appears only once
complete (written under a temporary name, then renamed), so a crash mid-save never
leaves a checkpoint that resume would trust.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Optional

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any]) -> str:
    """Write `state` (tensors, dicts, RNG states) for `step`; returns the directory."""
    final = checkpoint_dir(run_dir, step)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step, or None."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return os.path.join(root, max(steps)[1]) if steps else None


def load_checkpoint(path: str) -> dict[str, Any]:
    state_path = os.path.join(path, "state.pt")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a MegaDual checkpoint (no state.pt)")
    return torch.load(state_path, map_location="cpu", weights_only=True)
