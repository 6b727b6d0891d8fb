"""Real launches: `deepspeed` (and `torchrun`) start 2 CPU ranks of `megadual train-lm` on the
debug config; each layout must finish with a falling loss and a complete run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megadual.launch import deepspeed_command, free_port, launch_env, run_deepspeed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
LAUNCH_TIMEOUT_S = 300

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],
    "dp2-zero3": ["parallel.zero_stage=3"],
}


def _args(run_dir, overrides):
    sets = [f"run.out_dir={run_dir}", "train.steps=20", "data.num_samples=512", "run.log_every=1", *overrides]
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


def _last_record_per_step(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_killed_launch_resumes_on_the_uninterrupted_trajectory(tmp_path):
    """SIGKILL a 2-rank launch once its step-20 checkpoint is complete, rerun with --resume:
    every step after 20 logs exactly the uninterrupted run's loss."""
    layout = ["parallel.zero_stage=3", "train.steps=60", "train.save_every=20"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_deepspeed(2, _args(straight, layout), timeout=LAUNCH_TIMEOUT_S, log_path=str(tmp_path / "straight.log"))

    proc = subprocess.Popen(deepspeed_command(2, _args(killed, layout)), env=launch_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(killed, "checkpoints", "latest")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (os.path.isfile(latest) and open(latest).read().strip() == "step_000020"):
        assert proc.poll() is None, "the launch ended before its step-20 checkpoint"
        assert time.monotonic() < deadline, "no step-20 checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(_last_record_per_step(killed)) < 60, "killed too late to test anything"

    run_deepspeed(2, [*_args(killed, layout), "--resume"], timeout=LAUNCH_TIMEOUT_S,
                  log_path=str(tmp_path / "resumed.log"))
    want, got = _last_record_per_step(straight), _last_record_per_step(killed)
    assert sorted(got) == list(range(1, 61))
    for step in range(21, 61):
        assert got[step]["loss"] == want[step]["loss"], f"step {step}"


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the process with RANK=rank among the launch's processes (from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{entry}/stat") as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError):
            continue
        if session == launcher_pid and env.get(b"RANK") == str(rank).encode() and b"MEGADUAL_TEST_HANG" in env:
            return int(entry)
    return None


def test_a_stopped_rank_ends_the_launch_naming_it(tmp_path):
    """Before: SIGSTOP of one rank left the other waiting past 180 s with no message."""
    run_dir = str(tmp_path / "run")
    args = _args(run_dir, ["train.steps=100000", "parallel.collective_timeout_s=5"])
    proc = subprocess.Popen(deepspeed_command(2, args), env={**launch_env(), "MEGADUAL_TEST_HANG": "1"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "rank(s) 1 did not answer a collective within parallel.collective_timeout_s=5 s" in out, out[-3000:]
    assert waited < 60  # the 5 s timeout, the 5 s roll call, and the launcher's teardown
