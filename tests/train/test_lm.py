"""Backbone LM training: loss falls, the run directory is complete, resume is exact."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from megadual.config import load_config
from megadual.train.lm import train_lm

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")


def _config(run_dir, *overrides):
    return load_config(
        DEBUG_CONFIG,
        [f"run.out_dir={run_dir}", "data.num_samples=256", "train.seq_len=96", "train.micro_batch_size=4",
         "train.grad_accum=2", "optim.warmup_steps=2", *overrides],
    )


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    cfg = _config(tmp_path, "train.steps=25")
    result = train_lm(cfg, show_progress=False)
    records = _losses(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 26))
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "step_time"}
    assert records[0]["tokens"] == 2 * 4 * 96
    assert result.last_loss < 0.6 * result.first_loss
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert os.path.isfile(tmp_path / "checkpoints" / "step_000025" / "state.pt")


def test_resume_continues_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    train_lm(_config(straight, "train.steps=6", "train.save_every=3"), show_progress=False)
    expected = _losses(straight)

    # Simulate a crash after step 3: keep that checkpoint and the metrics written before it.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected[:3]))
    train_lm(_config(resumed, "train.steps=6", "train.save_every=3"), resume=True, show_progress=False)
    got = _losses(resumed)
    assert [r["step"] for r in got] == list(range(1, 7))
    for want, have in zip(expected[3:], got[3:]):
        assert have["loss"] == want["loss"] and have["grad_norm"] == want["grad_norm"]


def test_vocab_too_small_for_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="backbone.vocab_size: got 200"):
        train_lm(_config(tmp_path, "train.steps=1", "backbone.vocab_size=200"), show_progress=False)
