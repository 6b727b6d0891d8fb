"""Resuming a checkpoint on another data-parallel size, through DeepSpeed's universal checkpoints.

ZeRO 1-3 partition the optimizer states (stage 3 the weights too) over the data-parallel
ranks, and DeepSpeed refuses to load partitions written by another number of ranks. Its own
answer is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal` merges the
partitions into one folder per parameter (fp32 weights, both Adam moments, the step), and an
engine loading with `checkpoint.load_universal` re-partitions them over its own ranks.

Here rank 0 converts a tag once, into <run>/checkpoints/universal/<tag>/ (each DeepSpeed
checkpoint inside the tag too, e.g. the tokenizer's discriminator), written beside and renamed
into place so a crash never leaves half a conversion; every rank then loads it. ZeRO-0 keeps
whole optimizer states on every rank and loads on any size without a conversion. The module's
state other than its parameters (EMA codebooks and counts, the quantizers' restart generators)
is read from the original tag, since DeepSpeed's universal load skips the file that holds it.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import shutil
import subprocess
import sys
from typing import Callable, Optional

import torch

from megadual.fs import fsync_directory

logger = logging.getLogger(__name__)

UNIVERSAL = "universal"
# What DeepSpeed's converter needs in every checkpoint's client state. Our tensor-parallel
# layers would also need their split patterns here; resizing is offered for tp = pp = 1 only.
UNIVERSAL_INFO = {"universal_checkpoint_info": {}}
_MODEL_STATES = "*mp_rank_00_model_states.pt"  # zero_pp_rank_N_ in front under ZeRO-3


def saved_partitions(tag_dir: str) -> int:
    """How many data-parallel ranks the ZeRO optimizer states in `tag_dir` are split over
    (0: no ZeRO partitions, every rank saved the whole optimizer)."""
    return len(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def needs_conversion(tag_dir: str, dp_size: int) -> bool:
    """Whether this run (`dp_size` data-parallel ranks) must load `tag_dir` as a universal checkpoint."""
    return saved_partitions(tag_dir) not in (0, dp_size)


def check_resizable(tag_dir: str, dp_size: int, tp: int, pp: int) -> None:
    """Refuse, in words, a size change this module cannot carry (tensor or pipeline parallel)."""
    if needs_conversion(tag_dir, dp_size) and (tp > 1 or pp > 1):
        raise ValueError(
            f"{tag_dir} was saved by {saved_partitions(tag_dir)} data-parallel ranks and this run has {dp_size}; "
            f"changing the data-parallel size is supported with parallel.tp=1 and parallel.pp=1 (got tp={tp}, "
            f"pp={pp}): resume on {saved_partitions(tag_dir)} data-parallel ranks, or merge the checkpoint with "
            "`megadual convert reshard` first"
        )


def universal_tag_dir(checkpoint_root: str, tag: str) -> str:
    return os.path.join(checkpoint_root, UNIVERSAL, tag)


def _deepspeed_checkpoints(tag_dir: str) -> list[str]:
    """`tag_dir` and every folder below it that holds a DeepSpeed checkpoint, relative to it."""
    return sorted({os.path.relpath(os.path.dirname(p), tag_dir)
                   for p in glob.glob(os.path.join(tag_dir, "**", _MODEL_STATES), recursive=True)})


def _stage_inputs(source: str, scratch: str) -> None:
    """What DeepSpeed's converter reads, in `scratch`: links to `source`'s own files (it counts
    model-state files recursively, so a nested checkpoint such as the tokenizer's discriminator
    is converted on its own), except model states holding non-tensor entries (a quantizer's
    generator state), which it cannot convert: those get a copy without them (the load reads
    them from `source`, `load_universal`)."""
    os.makedirs(scratch)
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            continue
        if fnmatch.fnmatch(name, _MODEL_STATES):
            states = torch.load(path, map_location="cpu", weights_only=False)
            module = states.get("module") or {}
            if any(not isinstance(v, torch.Tensor) for v in module.values()):
                states["module"] = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
                torch.save(states, os.path.join(scratch, name))
                continue
        os.symlink(os.path.abspath(path), os.path.join(scratch, name))


def _convert_one(source: str, target: str, scratch: str) -> None:
    """Convert the DeepSpeed checkpoint in `source` into `target` (reading through `scratch`)."""
    _stage_inputs(source, scratch)
    workers = str(max(1, min(8, (os.cpu_count() or 1) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", scratch,
           "--output_folder", target, "--num_extract_workers", workers, "--num_merge_workers", workers]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"converting {source} to a universal checkpoint failed (rc {done.returncode}): {tail[0]}")


def convert_to_universal(checkpoint_root: str, tag: str) -> str:
    """Write the universal form of checkpoint `tag` (if it is not there yet); returns its folder."""
    target = universal_tag_dir(checkpoint_root, tag)
    if os.path.isdir(target):
        return target
    source = os.path.join(checkpoint_root, tag)
    staging, scratch = f"{target}.partial", f"{target}.inputs"
    for leftover in (staging, scratch):  # of a conversion that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    for rel in _deepspeed_checkpoints(source):
        logger.info("converting %s to a universal checkpoint", os.path.join(source, rel))
        _convert_one(os.path.normpath(os.path.join(source, rel)), os.path.normpath(os.path.join(staging, rel)),
                     os.path.normpath(os.path.join(scratch, rel)))
    shutil.rmtree(scratch)
    os.rename(staging, target)
    fsync_directory(os.path.dirname(target))
    return target


def prepare_resize(checkpoint_root: str, tag: str, dp_size: int, is_writer: bool,
                   barrier: Callable[[], None]) -> Optional[str]:
    """The folder every rank loads `tag` from when this run has another data-parallel size
    than the one that saved it (rank 0 converts, the others wait), or None when it has the same.
    Collective: call on every rank."""
    if not needs_conversion(os.path.join(checkpoint_root, tag), dp_size):
        return None
    if is_writer:
        convert_to_universal(checkpoint_root, tag)
    barrier()
    return universal_tag_dir(checkpoint_root, tag)


def load_universal(engine, universal_dir: str, source_dir: str) -> Optional[dict]:
    """Load the universal checkpoint `universal_dir` (converted from `source_dir`) into `engine`;
    returns the client state. Parameters and optimizer states come from the universal form; the
    module's other state (EMA codebook buffers, a quantizer's generator) from `source_dir`,
    because DeepSpeed's universal load skips the model-states file that holds it.

    DeepSpeed reads `checkpoint.load_universal` only inside load_checkpoint, so it is switched
    on for this load and off after it (a later resume on the same size loads ordinary
    checkpoints). DeepSpeed 0.19.8's ZeRO-3 universal load gives every param group the
    hyperparameters of the first (weight decay lands on the no-decay group, the tokenizer's
    tower gets the generator's learning rate): each group's own are put back from the
    checkpoint's optimizer state.
    """
    engine._config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(os.path.dirname(universal_dir), tag=os.path.basename(universal_dir))
    finally:
        engine._config.load_universal_checkpoint = False
    _load_module_extras(engine.module, source_dir)
    saved = torch.load(os.path.join(universal_dir, "zero", "optimizer_state.pt"), map_location="cpu",
                       weights_only=False)["param_groups"]
    groups = engine.optimizer.param_groups
    assert len(saved) == len(groups), f"{len(saved)} saved param groups, the optimizer has {len(groups)}"
    for group, hyper in zip(groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    return client_state


def _load_module_extras(module: torch.nn.Module, tag_dir: str) -> None:
    """Load everything of the saved module state but its parameters (buffers, extra state)."""
    path = sorted(glob.glob(os.path.join(tag_dir, _MODEL_STATES)))[0]
    saved = torch.load(path, map_location="cpu", weights_only=False)["module"]
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}  # tied ones too
    unexpected = module.load_state_dict({k: v for k, v in saved.items() if k not in params}, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path} holds module state this model does not have: {unexpected[:5]}")


def own_step_counters(engine) -> None:
    """Give every optimizer state its own Adam step counter after a load.

    torch's Optimizer.load_state_dict keeps a loaded "step" tensor as it is, and DeepSpeed's
    ZeRO-3 loads can hand one tensor to several parameter groups (its universal load does so
    outright, its plain load did so in a measured dp2 resume). Each group's step then
    advances the shared counter, so Adam's bias correction of every later group runs ahead
    and the resumed run leaves the uninterrupted trajectory (by 3e-5 relative in 2 steps here).
    """
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # DeepSpeed's ZeRO wrappers hold torch's optimizer
        optimizer = optimizer.optimizer
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()

