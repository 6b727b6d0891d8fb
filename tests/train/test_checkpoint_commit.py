"""Checkpoints are committed only when every rank's files are on disk (train/checkpoint.py).

The fault: on 2 data-parallel ranks (ZeRO-1, one optimizer partition file per rank), rank 1
dies while writing its partition of the step-4 checkpoint. DeepSpeed's own `latest` (rank 0,
no wait) named step 4 then, and `--resume` failed on the missing rank-1 file. Now `latest`
stays at step 2, a `latest` that names an incomplete tag is passed over for the newest complete
one, and the resumed run logs exactly the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import logging
import os

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest

from megadual.config import load_config
from megadual.train.checkpoint import COMPLETE, incomplete_reason, newest_complete_tag
from megadual.train.lm import train_lm
from tests._dist import RankError, run_distributed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
OVERRIDES = ["data.num_samples=256", "train.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=2",
             "train.steps=6", "train.save_every=2", "parallel.zero_stage=1"]


def _train(rank, world_size, run_dir, resume=False, die_saving=None):
    if die_saving is not None and rank == 1:
        from deepspeed.runtime.engine import DeepSpeedEngine

        save_partition = DeepSpeedEngine._save_zero_checkpoint

        def dying(self, save_path, tag):
            if tag == die_saving:
                os._exit(9)  # as a kill -9 in the middle of writing this rank's files
            return save_partition(self, save_path, tag)

        DeepSpeedEngine._save_zero_checkpoint = dying
    cfg = load_config(DEBUG_CONFIG, [f"run.out_dir={run_dir}", *OVERRIDES])
    train_lm(cfg, resume=resume, show_progress=False)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_a_rank_killed_mid_save_never_leaves_latest_on_a_torn_checkpoint(tmp_path, caplog):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_distributed(_train, world_size=2, timeout=300, args=(straight,))
    with pytest.raises(RankError) as info:
        run_distributed(_train, world_size=2, timeout=300, args=(killed, False, "step_000004"))
    assert info.value.rank == 1 and info.value.exitcode == 9

    root = os.path.join(killed, "checkpoints")
    assert open(os.path.join(root, "latest")).read() == "step_000002"
    assert "missing" in incomplete_reason(os.path.join(root, "step_000004"))
    assert incomplete_reason(os.path.join(root, "step_000002")) is None

    # A `latest` naming the torn tag (what DeepSpeed's own writer left) is passed over, saying so.
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_000004")
    with caplog.at_level(logging.WARNING, logger="megadual.train.checkpoint"):
        assert newest_complete_tag(root) == "step_000002"
    assert "step_000004" in caplog.text and COMPLETE in caplog.text

    run_distributed(_train, world_size=2, timeout=300, args=(killed, True))
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(3, 7)] == [want[s] for s in range(3, 7)]
    assert incomplete_reason(os.path.join(root, "step_000006")) is None


def test_a_truncated_file_makes_a_tag_incomplete(tmp_path):
    run_distributed(_train, world_size=1, timeout=300, args=(str(tmp_path),))
    root = tmp_path / "checkpoints"
    assert newest_complete_tag(str(root)) == "step_000006"
    model_states = next((root / "step_000006").glob("*model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:100])
    assert "has 100 bytes" in incomplete_reason(str(root / "step_000006"))
    assert newest_complete_tag(str(root)) == "step_000004"


def _train_on_a_full_disk(rank, world_size, run_dir):
    import torch

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if "step_000004" in str(f):  # what torch.save raises when the disk fills mid-file
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    torch.save = full
    _train(rank, world_size, run_dir)


def test_a_full_disk_during_a_save_is_one_line_naming_the_checkpoint(tmp_path):
    """Before: RuntimeError: [enforce fail at inline_container.cc:672], naming no file or disk."""
    with pytest.raises(RankError) as info:
        run_distributed(_train_on_a_full_disk, world_size=1, timeout=300, args=(str(tmp_path),))
    message = str(info.value)
    assert "OSError: cannot write checkpoint" in message and "step_000004 ([enforce fail" in message
    assert "GiB free there" in message
    root = os.path.join(tmp_path, "checkpoints")
    assert open(os.path.join(root, "latest")).read() == "step_000002"  # the last complete one
