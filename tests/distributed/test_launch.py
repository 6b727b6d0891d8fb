"""Real launches: `deepspeed` (and `torchrun`) start 2 CPU ranks of `megadual train-lm` on the
debug config; each layout must finish with a falling loss and a complete run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megadual.launch import free_port, launch_env, run_deepspeed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
LAUNCH_TIMEOUT_S = 300

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],
    "dp2-zero3": ["parallel.zero_stage=3"],
}


def _args(run_dir, overrides):
    sets = [f"run.out_dir={run_dir}", "train.steps=20", "data.num_samples=512", *overrides]
    return ["train-lm", "--config", DEBUG_CONFIG, *[a for s in sets for a in ("--set", s)]]


def _check_run(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in records)
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == "step_000020"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_deepspeed_launch(layout, tmp_path):
    run_dir = str(tmp_path / "run")
    run_deepspeed(2, _args(run_dir, LAYOUTS[layout]), timeout=LAUNCH_TIMEOUT_S, log_path=str(tmp_path / "launch.log"))
    _check_run(run_dir)


def test_torchrun_launch(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megadual", *_args(run_dir, ["parallel.tp=2", "parallel.zero_stage=3"])]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(run_dir)
