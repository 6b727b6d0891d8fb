"""Multi-node launches, simulated on one machine the way the launchers allow it.

A hostfile of two nodes with 2 slots each and one `deepspeed --hostfile H --no_ssh --node_rank N
--master_addr 127.0.0.1 ...` per node, started side by side (4 CPU ranks); the same with
`torchrun --nnodes 2 --node_rank N`. Each node's launcher tells its ranks the node's rank count
(LOCAL_SIZE / LOCAL_WORLD_SIZE), so tensor-parallel groups stay inside a node and data or
pipeline parallelism spans the two. Losses equal the single-process run (relative 1e-5 over 5
steps, as in test_deepspeed_layouts.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megadual.launch import deepspeed_launcher, free_port, launch_env
from tests.distributed.test_deepspeed_layouts import DEBUG_CONFIG, RTOL, SETTINGS, STEPS, _config, reference_losses
from tests.train.mm_fixtures import write_scene_token_shards
from tests.train.test_mllm_training import MLLM_CONFIG
from tests.train.test_mllm_training import _config as mllm_config
from tests.train.test_mllm_training import reference_losses as mllm_reference_losses

HOSTFILE = "node0 slots=2\nnode1 slots=2\n"


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def _deepspeed_node(hostfile, node_rank, port, args):
    return [deepspeed_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--master_addr",
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
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    cfg = _config(tmp_path / "run", *overrides)
    _assert_matches(_losses(tmp_path / "run"), reference_losses(cfg, dp=4 // (cfg.parallel.tp * cfg.parallel.pp)), name)


@pytest.fixture
def two_network_namespaces():
    """Two network namespaces joined by a veth pair, 10.77.N.1 and .2: each simulated node gets
    its own address, so the master address is not loopback. Skips where namespaces cannot be made."""
    tag = f"md{os.getpid() % 10000}"
    names, links = [f"{tag}n0", f"{tag}n1"], [f"{tag}v0", f"{tag}v1"]
    subnet = f"10.77.{os.getpid() % 250}"
    setup = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for n in (0, 1):
        setup += [["ip", "link", "set", links[n], "netns", names[n]],
                  ["ip", "-n", names[n], "addr", "add", f"{subnet}.{n + 1}/24", "dev", links[n]],
                  ["ip", "-n", names[n], "link", "set", links[n], "up"], ["ip", "-n", names[n], "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            if subprocess.run(cmd, capture_output=True).returncode:
                pytest.skip(f"network namespaces are not permitted here ({' '.join(cmd)} failed)")
        # Per node: the command prefix, and gloo's interface (its default, the hostname's address, is not there).
        yield f"{subnet}.1", [(["ip", "netns", "exec", names[n]], {"GLOO_SOCKET_IFNAME": links[n]}) for n in (0, 1)]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_deepspeed_two_nodes_in_their_own_network_namespaces(tmp_path, two_network_namespaces):
    master, nodes = two_network_namespaces
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = ["parallel.tp=2", "parallel.zero_stage=1"]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *SETTINGS, *overrides])]
    port = free_port()
    commands = []
    for n, (prefix, env) in enumerate(nodes):
        command = _deepspeed_node(hostfile, n, port, args)
        command[command.index("127.0.0.1")] = master
        commands.append(prefix + ["env", *(f"{k}={v}" for k, v in env.items())] + command)
    codes, errors = _run_nodes(commands)
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    _assert_matches(_losses(tmp_path / "run"), reference_losses(_config(tmp_path / "run", *overrides), dp=2),
                    f"two network namespaces, master {master}")


def test_torchrun_two_nodes_train_lm(tmp_path):
    overrides = ["parallel.tp=2", "parallel.zero_stage=1"]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_torchrun_node(n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    _assert_matches(_losses(tmp_path / "run"), reference_losses(_config(tmp_path / "run", *overrides), dp=2),
                    "torchrun, tp2 x dp2")


UNIFIED_LAYOUTS = {
    "tp2 in a node x dp2 across, ZeRO-1": ["parallel.tp=2", "parallel.zero_stage=1"],
    "tp2 in a node x dp2 across, ZeRO-3": ["parallel.tp=2", "parallel.zero_stage=3"],
    "pp2 across nodes x tp2 in a node": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_scene_token_shards(str(path), num_samples=256)
    return path


@pytest.mark.parametrize("name", list(UNIFIED_LAYOUTS))
def test_deepspeed_two_nodes_train_unified_model(name, tmp_path, shards):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = [*UNIFIED_LAYOUTS[name], f"train.steps={STEPS}", "optim.warmup_steps=2"]
    run = tmp_path / "run"
    args = ["train", "-c", MLLM_CONFIG, *_sets([f"run.out_dir={run}", f"loader.paths=[{shards}]", *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    cfg = mllm_config(run, str(shards), *overrides)
    dp = 4 // (cfg.parallel.tp * cfg.parallel.pp)
    _assert_matches(_losses(run), mllm_reference_losses(cfg, dp=dp), f"unified model, {name}")


def test_a_tp_group_across_the_two_nodes_is_refused_before_training(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    overrides = ["parallel.tp=4", "backbone.num_kv_heads=4"]
    args = ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={tmp_path / 'run'}", *SETTINGS, *overrides])]
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args) for n in (0, 1)], timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    for err in errors:
        assert "parallel.tp: got 4, expected a divisor of the 2 ranks per node" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _wait_for_a_save_in_progress(checkpoints, deadline_s=120):
    """Poll until a step tag exists whose completion record is not written yet (mid-save)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        tags = sorted(checkpoints.glob("step_*")) if checkpoints.exists() else []
        if tags and len(tags) >= 2 and not (tags[-1] / "complete.json").exists():
            return tags[-1].name
        time.sleep(0.01)
    raise AssertionError("no save in progress seen")


def test_a_node_killed_mid_save_ends_the_job_and_resume_equals_the_uninterrupted_run(tmp_path):
    """Node 1 dies (SIGKILL of its launcher's whole process group) while a checkpoint is being
    written: node 0's ranks leave within seconds naming ranks 2 and 3 and the last complete
    checkpoint, `latest` never names the torn tag, and both nodes resumed give the losses of a
    run that was never interrupted."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    settings = ["parallel.tp=2", "parallel.zero_stage=1", "train.steps=16", "train.save_every=2",
                "train.seq_len=64", "data.num_samples=512", "parallel.collective_timeout_s=20"]

    def args(run, *extra):
        return ["train-lm", "-c", DEBUG_CONFIG, *_sets([f"run.out_dir={run}", *settings]), *extra]

    straight = tmp_path / "straight"
    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args(straight)) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:]

    run = tmp_path / "run"
    port = free_port()
    nodes = [subprocess.Popen(_deepspeed_node(hostfile, n, port, args(run)), env=launch_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    try:
        torn = _wait_for_a_save_in_progress(run / "checkpoints")
        os.killpg(nodes[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        err = nodes[0].communicate(timeout=120)[1]
        took = time.monotonic() - killed_at
    finally:
        for p in nodes:
            p.kill()
    print(f"node 1 killed while {torn} was being written; node 0 exited {nodes[0].returncode} after {took:.1f} s:"
          f" {err.splitlines()[-1] if err else None}")
    assert nodes[0].returncode != 0 and took < 60
    lines = [line for line in err.splitlines() if "megadual: error:" in line]
    assert lines and all("rank(s) 2, 3 left a collective" in line for line in lines), err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "complete.json").exists()
    assert f"the last complete checkpoint is {run / 'checkpoints' / latest}" in lines[0]

    port = free_port()
    codes, errors = _run_nodes([_deepspeed_node(hostfile, n, port, args(run, "--resume")) for n in (0, 1)])
    assert codes == [0, 0], errors[0][-3000:]
    resumed = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():  # a step logged twice keeps its last record
        record = json.loads(line)
        resumed[record["step"]] = record["loss"]
    assert [resumed[s] for s in sorted(resumed)] == _losses(straight)
