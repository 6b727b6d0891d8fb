"""Committing training checkpoints, and reading trained weights back out of a run directory.

Layout: <run>/checkpoints/step_000123/ as DeepSpeed writes it, plus two files of ours:

    step_000123/complete.json   written last: every file of the tag and its size
    latest                      the newest committed tag

DeepSpeed's own `latest` is written by rank 0 before the other ranks have finished their files
(0.19.8 does not wait), so a crash in that window left `latest` naming a checkpoint that cannot
be loaded. Here every rank flushes its files to disk, the ranks meet at a barrier, and only then
does rank 0 record the tag (`commit_checkpoint`); both files are replaced atomically. A reader
trusts `latest` only when its tag is complete and otherwise falls back to the newest complete
tag (`newest_complete_tag`); in a run without any completion record (DeepSpeed's own saves,
older runs) `latest` is all there is, and it is trusted.

Whole-model weights are read here for the layouts that store them whole (tp = pp = 1); ZeRO-3
partitions are consolidated with DeepSpeed's own `zero_to_fp32`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Callable, Optional

import torch

from megadual.fs import fsync_directory, write_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"


def _files_under(directory: str) -> list[str]:
    """Paths of every file below `directory`."""
    return [os.path.join(parent, name) for parent, _, names in os.walk(directory) for name in names]


def _tag_files(tag_dir: str) -> dict[str, int]:
    """Every file under `tag_dir` but the completion record: relative path -> size in bytes."""
    files = {os.path.relpath(path, tag_dir): os.path.getsize(path) for path in _files_under(tag_dir)}
    files.pop(COMPLETE, None)
    return files


def flush_tag(tag_dir: str) -> None:
    """fsync every file and directory of a tag (what this rank wrote is on disk after it)."""
    for path in _files_under(tag_dir):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for parent, _, _ in os.walk(tag_dir):
        fsync_directory(parent)


def commit_checkpoint(root: str, tag: str, is_writer: bool, barrier: Callable[[], None]) -> None:
    """Make `tag` the newest complete checkpoint under `root` (collective: call on every rank).

    Every rank flushes the tag's files, then `barrier()`; rank 0 (`is_writer`) then writes
    complete.json (the tag's files and sizes) and points `latest` at the tag.
    """
    tag_dir = os.path.join(root, tag)
    flush_tag(tag_dir)
    barrier()
    if is_writer:
        write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps({"tag": tag, "files": _tag_files(tag_dir)},
                                                                  indent=1, sort_keys=True))
        write_atomic(os.path.join(root, LATEST), tag)


def unwritable_checkpoint_error(tag_dir: str, error: BaseException) -> OSError:
    """A failed save as one line: the checkpoint, the cause (torch.save words a full disk as
    "[enforce fail at inline_container.cc...]") and the space left; `latest` still names the
    last complete checkpoint."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        free = f"{shutil.disk_usage(os.path.dirname(tag_dir)).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "its disk cannot be read"
    return OSError(f"cannot write checkpoint {tag_dir} ({cause}); {free}: free space or point run.out_dir at "
                   "another disk, then --resume from the last complete checkpoint")


def incomplete_reason(tag_dir: str) -> Optional[str]:
    """Why the checkpoint in `tag_dir` cannot be loaded, or None when it is complete."""
    marker = os.path.join(tag_dir, COMPLETE)
    if not os.path.isfile(marker):
        return f"{marker} is missing (its save never finished)"
    try:
        with open(marker, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{marker} is unreadable ({e})"
    for rel, size in sorted(files.items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def _step_tags(root: str) -> list[str]:
    """Names of the step_N directories under `root`, newest step first."""
    tags = [os.path.basename(n) for n in glob.glob(os.path.join(root, "step_*")) if os.path.isdir(n)]
    return sorted(tags, key=lambda t: int(t.removeprefix("step_")), reverse=True)


def _has_completion_records(root: str) -> bool:
    return any(os.path.isfile(os.path.join(root, tag, COMPLETE)) for tag in _step_tags(root))


def _read_latest(root: str) -> Optional[str]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def newest_complete_tag(root: str) -> Optional[str]:
    """The tag `latest` names when it is complete, else the newest complete step tag (saying
    why `latest` was passed over), else None (no checkpoint to resume from).

    Checkpoints without any completion record (written by DeepSpeed's own `save_checkpoint`,
    or by MegaDual before records existed) have only `latest` to go by: it is trusted.
    """
    latest = _read_latest(root)
    if not _has_completion_records(root):
        return latest if latest is not None and os.path.isdir(os.path.join(root, latest)) else None
    if latest is not None:
        reason = incomplete_reason(os.path.join(root, latest))
        if reason is None:
            return latest
        logger.warning("checkpoint %s named by %s is incomplete: %s", latest, os.path.join(root, LATEST), reason)
    for tag in _step_tags(root):
        if tag != latest and incomplete_reason(os.path.join(root, tag)) is None:
            if latest is not None:
                logger.warning("using %s, the newest complete checkpoint under %s", tag, root)
            return tag
    return None


def checkpoint_tag_dir(run_dir: str, tag: Optional[str] = None) -> str:
    """The directory of checkpoint `tag`, default the newest complete one."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if tag is None:
        tag = newest_complete_tag(root)
        if tag is None:
            latest = _read_latest(root)
            why = f" ({latest}: {incomplete_reason(os.path.join(root, latest))})" if latest else ""
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {root}{why}")
    path = os.path.join(root, tag)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints `<run>/checkpoints/step_N/` holds, in increasing order."""
    return sorted(int(tag.removeprefix("step_")) for tag in _step_tags(os.path.join(run_dir, CHECKPOINTS)))


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
    return {k: v.float() for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
