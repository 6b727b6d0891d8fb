"""Ranks from SLURM: `srun` starting `python -m megadual` directly (no launcher) sets only
SLURM_* variables; the ranks, the rendezvous address and each node's rank count come from them.

Two simulated nodes of two tasks each (4 CPU ranks) train tp=2 (inside a node) x dp=2 (across
nodes) and must log the single-process run's losses."""

import json
import os
import subprocess
import sys

import pytest

from megadual.distributed.runtime import first_host, slurm_environment
from megadual.launch import free_port
from tests.distributed.test_deepspeed_layouts import DEBUG_CONFIG, RTOL, SETTINGS, STEPS, _config, reference_losses

OVERRIDES = ["parallel.tp=2"]


@pytest.mark.parametrize("nodelist, first", [("gpu[07-09,12],cpu1", "gpu07"), ("a,b", "a"), ("node3", "node3"),
                                             ("rack1-n[5-6]", "rack1-n5")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_variables_give_ranks_only_without_a_launcher():
    task = {"SLURM_PROCID": "3", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "4,2", "SLURM_JOB_ID": "12345"}
    assert slurm_environment(task) == {"RANK": "3", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                       "MASTER_ADDR": "n1", "MASTER_PORT": "22345"}
    assert slurm_environment({**task, "RANK": "0"}) == {}  # torchrun / deepspeed under SLURM keep their own
    assert slurm_environment({**task, "MASTER_ADDR": "head", "MASTER_PORT": "7"})["MASTER_ADDR"] == "head"


def _task_env(rank, port):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(port), SLURM_PROCID=str(rank), SLURM_NTASKS="4",
               SLURM_LOCALID=str(rank % 2), SLURM_NODEID=str(rank // 2), SLURM_NODELIST="localhost,localhost",
               SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_ID="4242")
    return env


def test_two_simulated_nodes_under_srun_match_the_single_process_run(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _config(run_dir, *OVERRIDES)
    sets = [a for o in [f"run.out_dir={run_dir}", *SETTINGS, *OVERRIDES] for a in ("--set", o)]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "megadual", "train-lm", "-c", DEBUG_CONFIG, *sets],
                              env=_task_env(rank, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors[0][-3000:]
    got = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = reference_losses(cfg, dp=2)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"srun-style tp2 x dp2 over 2 simulated nodes: max relative loss difference vs single process {worst:.2e}")
    assert len(got) == STEPS and worst <= RTOL
