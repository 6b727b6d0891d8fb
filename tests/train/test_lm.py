"""`train_lm` in one process (a world of one; DeepSpeed engine): loss falls, the run directory
is complete, and a resumed run continues bit for bit. Each run is forked so the test
process never holds a process group."""

from __future__ import annotations

import json
import os
import shutil

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest

from megadual.config import load_config
from megadual.train.checkpoint import load_model_state
from megadual.train.lm import latest_step, train_lm
from tests._dist import run_distributed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")


def _config(run_dir, *overrides):
    return load_config(
        DEBUG_CONFIG,
        [f"run.out_dir={run_dir}", "data.num_samples=256", "train.seq_len=96", "train.micro_batch_size=4",
         "train.grad_accum=2", "optim.warmup_steps=2", *overrides],
    )


def _train(rank, world_size, run_dir, overrides, resume=False):
    result = train_lm(_config(run_dir, *overrides), resume=resume, show_progress=False)
    return result.first_loss, result.last_loss


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    overrides = ["train.steps=25", "run.wandb_project=megadual-tests"]
    first, last = run_distributed(_train, world_size=1, timeout=180, args=(str(tmp_path), overrides))[0]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 26))
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "step_time", "skipped_steps"}
    assert records[0]["tokens"] == 2 * 4 * 96
    assert all(r["grad_norm"] > 0 for r in records)
    assert last < 0.6 * first
    assert load_config(str(tmp_path / "config.yaml")) == _config(tmp_path, *overrides)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # logged offline, no network
    assert latest_step(str(tmp_path)) == 25
    assert "backbone.embed_tokens.weight" in load_model_state(str(tmp_path))


def test_resume_continues_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = ["train.steps=6", "train.save_every=3"]
    run_distributed(_train, world_size=1, timeout=180, args=(str(straight), overrides))
    expected = _records(straight)

    # As if killed after the step-3 checkpoint: drop what came later.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:3]))
    run_distributed(_train, world_size=1, timeout=180, args=(str(resumed), overrides, True))
    got = _records(resumed)
    assert [r["step"] for r in got] == list(range(1, 7))
    for want, have in zip(expected[3:], got[3:]):
        assert (have["loss"], have["grad_norm"], have["lr"]) == (want["loss"], want["grad_norm"], want["lr"])


def test_vocab_too_small_for_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="backbone.vocab_size: got 200"):
        train_lm(_config(tmp_path, "train.steps=1", "backbone.vocab_size=200"), show_progress=False)


def test_bad_layout_fails_before_process_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divide the world size 3"):
        train_lm(_config(tmp_path, "train.steps=1", "parallel.tp=2"), show_progress=False)
    import torch.distributed

    assert not torch.distributed.is_initialized()
