"""Process-group start-up for every launcher: `deepspeed`, `torchrun`, or a plain `python`.

`init_distributed()` reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as
both launchers set them (a plain process becomes a world of one on a free port) and starts
DeepSpeed's communication backend: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out for port-0 binds and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(attempts: int = 64) -> int:
    """A TCP port free right now, for a launcher's rendezvous (both launchers default to 29500,
    so concurrent runs collide).

    Drawn below the ephemeral range on purpose: a port the kernel picked (a bind to port 0) is
    free again once checked, and gloo's peer listeners and every outgoing connection draw from
    that same range, so another job on the host could take it before the launcher binds it;
    a random port below the range is only ever taken by someone asking for it by number.
    """
    high = _ephemeral_port_floor()
    low = min(20000, high // 2)
    rng = random.Random()  # not the global generator: runs that seed it must not share ports
    for _ in range(attempts):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{low}, {high}) after {attempts} tries; "
                       "set MASTER_PORT (or --master_port) to one")


def _skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce.

    On the CPU accelerator `init_distributed` builds `deepspeed_shm_comm` on first use
    (100-190 s on 2 cores, and a killed build leaves a lock that hangs later runs). Only
    inference all-reduce uses it; training goes through gloo. The function is replaced in
    the module object itself because `deepspeed.comm` re-exports torch under that name.
    """
    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


_SLURM_TASK = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07", "a,b" -> "a"."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE ("4(x2),2": 4 on each of two nodes, then 2) for one node."""
    counts = []
    for item in tasks_per_node.split(","):
        count, _, times = item.partition("(x")
        counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return counts[min(node_id, len(counts) - 1)]


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What torch.distributed needs, from an `srun` task's SLURM_* variables.

    Only when no launcher set RANK (torchrun and deepspeed inside an allocation keep theirs):
    RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID and SLURM_TASKS_PER_NODE; MASTER_ADDR the node list's first host and
    MASTER_PORT one every task of the job derives alike from SLURM_JOB_ID, unless set.
    """
    if "RANK" in env or not all(name in env for name in _SLURM_TASK):
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"]}
    per_node = env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        out["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_host(env["SLURM_NODELIST"])
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    return out


def adopt_launcher_environment() -> None:
    """Fill RANK & co. from SLURM when `srun` started this process directly (idempotent)."""
    os.environ.update(slurm_environment(os.environ))


def ranks_per_node(world_size: int) -> int:
    """This node's rank count, as the launcher says it: torchrun's LOCAL_WORLD_SIZE, the
    deepspeed launcher's LOCAL_SIZE; without either, one node holds every rank."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return world_size


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # torch's own default


def init_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> ProcessInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device.

    Args:
        collective_timeout_s: how long a collective waits for its peers before it raises
            (a group that is already initialised keeps its own).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    adopt_launcher_environment()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch so it can be patched)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        _skip_shm_comm_build()
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        timeout = timedelta(seconds=collective_timeout_s)
        # Groups made later with no timeout of their own (DeepSpeed clones the world for data
        # parallelism, the topology makes tp/pp/dp groups) take torch's module default, 30
        # minutes, not the world's: set that default too, so every collective honours the setting.
        c10d = torch.distributed.distributed_c10d
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    elif not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    return ProcessInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )


class PeerFailureError(TimeoutError):
    """A collective waited past `parallel.collective_timeout_s` for a peer, or lost it (stopped,
    hung or dead)."""


# How the backends word a collective that waited past its timeout (gloo; NCCL's watchdog), and
# one whose peer process or node went away (gloo's TCP pairs; NCCL).
_TIMEOUT_WORDING = ("Timed out waiting", "collective operation timeout")
_PEER_LOST_WORDING = ("Connection closed by peer", "Connection reset by peer",
                      "remote process exited or there was a network error")


def is_collective_timeout(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(w in str(error) for w in _TIMEOUT_WORDING)


def is_peer_lost(error: BaseException) -> bool:
    """A collective failed because a peer rank stopped, hung or died (timed out or disconnected)."""
    return is_collective_timeout(error) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in _PEER_LOST_WORDING))


def unanswering_ranks(grace_s: float = 5.0) -> Optional[list[int]]:
    """After a collective timed out: the ranks that do not answer within `grace_s`.

    Every rank still running marks itself in the rendezvous store and waits for the others'
    marks; the ranks whose mark never comes are the ones that stopped. None when the store
    does not answer either (it lives in rank 0's process, which is then among them).
    """
    store = torch.distributed.distributed_c10d._get_default_store()
    world = torch.distributed.get_world_size()
    keys = [f"megadual/answered/{r}" for r in range(world)]
    try:
        store.set_timeout(timedelta(seconds=grace_s))
        store.set(keys[torch.distributed.get_rank()], "1")
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except RuntimeError:
        return None


def peer_failure_error(error: BaseException, timeout_s: float, after: str = "") -> PeerFailureError:
    """One line naming the ranks that did not answer a collective that timed out or lost a peer.

    Args:
        after: appended to the message (e.g. where to resume from).
    """
    missing = unanswering_ranks()
    who = ("rank 0 (it holds the rendezvous store, which does not answer either)" if missing is None
           else f"rank(s) {', '.join(map(str, missing))}" if missing else "a rank that answered too late")
    what = (f"did not answer a collective within parallel.collective_timeout_s={timeout_s:g} s"
            if is_collective_timeout(error) else "left a collective (its process or node is gone)")
    return PeerFailureError(f"{who} {what} (stopped, hung or dead; {str(error).strip().splitlines()[0]})"
                                  f"{after}")
