"""The plan against reality: the peak memory of real CPU training runs in four layouts.

Each layout trains a 7M-parameter backbone (the debug config, widened so that model states,
activations and logits dwarf allocator noise) for 3 steps, in fresh processes (`python -m
megadual`, or the deepspeed launcher for 2 ranks: a forked rank would reuse its parent's free
heap and under-report). Every rank records its own peak resident memory (VmHWM; getrusage's
ru_maxrss carries a large parent's size across fork and exec: late in this suite it reported
774 MiB for a 458 MiB run) and its memory before the model was built (ranks/rank_N.json). The
plan, which leaves out the process baseline, must come within 20% of the largest rank's peak
minus baseline. glibc's allocator would keep freed tensors resident (its mmap threshold grows
with the largest freed block), which a GPU's caching allocator does not count as allocated;
MALLOC_MMAP_THRESHOLD_ fixes that threshold so resident memory follows live tensors, as
torch.cuda.max_memory_allocated does.
"""

import json
import os
import subprocess

import pytest

from megadual.config import load_config
from megadual.launch import deepspeed_command, launch_env, megadual_command
from megadual.plan import Cluster, make_plan

DEBUG_LM = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
WIDER = ["backbone.hidden_size=256", "backbone.intermediate_size=768", "backbone.num_layers=4",
         "backbone.vocab_size=16384", "backbone.max_position_embeddings=512", "train.seq_len=256",
         "train.micro_batch_size=4", "train.steps=3", "data.num_samples=512", "optim.warmup_steps=1"]
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "dp2 ZeRO-3": (2, ["parallel.zero_stage=3"]),
    "pp2 ZeRO-1": (2, ["parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=2"]),
}


def _train(world_size, run_dir, overrides):
    sets = [arg for o in [f"run.out_dir={run_dir}", *WIDER, *overrides] for arg in ("--set", o)]
    args = ["train-lm", "-c", DEBUG_LM, *sets]
    cmd = megadual_command(args) if world_size == 1 else deepspeed_command(world_size, args)
    env = {**launch_env(), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _measured_mib(run_dir, world_size):
    peaks = []
    for rank in range(world_size):
        with open(os.path.join(run_dir, "ranks", f"rank_{rank}.json")) as f:
            stats = json.load(f)
        peaks.append(stats["peak_rss_mib"] - stats["baseline_rss_mib"])
    return max(peaks)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planned_peak_within_20_percent_of_measured(name, tmp_path):
    world_size, overrides = LAYOUTS[name]
    _train(world_size, str(tmp_path), overrides)
    measured = _measured_mib(str(tmp_path), world_size)
    cfg = load_config([DEBUG_LM], [*WIDER, *overrides])
    estimate = make_plan(cfg, Cluster(world_size, world_size, 2**40, 1.0, 1.0, 0)).layouts[0]
    planned = estimate.memory_per_rank_bytes["total"] / 2**20
    print(f"\n| {name} | planned {planned:.0f} MiB | measured {measured:.0f} MiB | {100 * (planned / measured - 1):+.1f}% |")
    assert planned == pytest.approx(measured, rel=0.2)
