"""Multi-node launches, simulated on one machine the way the launchers allow it.

A hostfile of two nodes with 2 slots each and one `deepspeed --hostfile H --no_ssh --node_rank N
--master_addr 127.0.0.1 ...` per node, started side by side (4 CPU ranks); the same with
`torchrun --nnodes 2 --node_rank N`. Each node's launcher tells its ranks the node's rank count
(LOCAL_SIZE / LOCAL_WORLD_SIZE), so tensor-parallel groups stay inside a node and data or
pipeline parallelism spans the two. Losses equal the single-process run (relative 1e-5 over 5
steps, as in test_deepspeed_layouts.py)."""

import json
import os
import subprocess
import sys

import pytest

from megadual.launch import deepspeed_command, free_port, launch_env
from tests.distributed.test_deepspeed_layouts import DEBUG_CONFIG, RTOL, STEPS, _config, reference_losses
from tests.train.mm_fixtures import write_scene_token_shards
from tests.train.test_mllm_training import MLLM_CONFIG
from tests.train.test_mllm_training import _config as mllm_config
from tests.train.test_mllm_training import reference_losses as mllm_reference_losses

LM_SETTINGS = [f"train.steps={STEPS}", "train.seq_len=64", "train.micro_batch_size=2", "train.grad_accum=2",
               "data.num_samples=256", "optim.warmup_steps=2"]
HOSTFILE = "node0 slots=2\nnode1 slots=2\n"


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def _deepspeed_node(hostfile, node_rank, port, args):
    launcher = deepspeed_command(2, args)[0]
    return [launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "--no_local_rank", "--module", "megadual", *args]


def _torchrun_node(node_rank, port, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "2", "-m", "megadual", *args]


def _run_nodes(commands, timeout=300):
    """Start every node's launcher at once; (return codes, their stderr)."""
    procs = [subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], errors


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_matches(got, want, what):
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"{what}: max relative loss difference vs single process {worst:.2e}")
    assert len(got) == STEPS and worst <= RTOL


LM_LAYOUTS = {  # name -> overrides; 4 ranks on 2 nodes of 2
    "tp2 in a node x dp2 across, ZeRO-1": ["parallel.tp=2", "parallel.zero_stage=1"],
    "tp2 in a node x dp2 across, ZeRO-3": ["parallel.tp=2", "parallel.zero_stage=3"],
    "pp2 across nodes x tp2 in a node": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
}


@pytest.mark.parametrize("name", list(LM_LAYOUTS))
def test_deepspeed_two_nodes_train_lm(name, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = LM_LAYOUTS[name]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *LM_SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    cfg = _config(tmp_path / "run", *overrides)
    _assert_matches(_losses(tmp_path / "run"), reference_losses(cfg, dp=4 // (cfg.parallel.tp * cfg.parallel.pp)), name)


def test_torchrun_two_nodes_train_lm(tmp_path):
    overrides = ["parallel.tp=2", "parallel.zero_stage=1"]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *LM_SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_torchrun_node(n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    _assert_matches(_losses(tmp_path / "run"), reference_losses(_config(tmp_path / "run", *overrides), dp=2),
                    "torchrun, tp2 x dp2")


def test_deepspeed_two_nodes_train_unified_model(tmp_path):
    shards = tmp_path / "tokens"
    write_scene_token_shards(str(shards), num_samples=256)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = ["parallel.tp=2", "parallel.zero_stage=1", f"train.steps={STEPS}", "optim.warmup_steps=2"]
    run = tmp_path / "run"
    args = ["train", "-c", MLLM_CONFIG, *_sets([f"run.out_dir={run}", f"loader.paths=[{shards}]", *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    cfg = mllm_config(run, str(shards), *overrides)
    _assert_matches(_losses(run), mllm_reference_losses(cfg, dp=2), "unified model, tp2 x dp2")


def test_a_tp_group_across_the_two_nodes_is_refused_before_training(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = ["parallel.tp=4", "backbone.num_kv_heads=4"]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *LM_SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)], timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    for err in errors:
        assert "parallel.tp: got 4, expected a divisor of the 2 ranks per node" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
