"""Start `megadual` subcommands on several local ranks with the `deepspeed` launcher.

Used by the demo and the launch tests; on a cluster run the launcher yourself (see the
README). Every rank gets one intra-op thread unless the caller's environment says
otherwise: the launcher leaves OMP_NUM_THREADS unset, and N ranks each using every core
run many times slower on a small machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Optional, Sequence

from megadual.distributed.runtime import free_port


def deepspeed_command(num_procs: int, megadual_args: Sequence[str], master_port: Optional[int] = None) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --no_local_rank --module megadual ARGS...`.

    `--num_gpus` also sets the number of CPU ranks on DeepSpeed's CPU accelerator;
    `--no_local_rank` because ranks read LOCAL_RANK from the environment, and the flag would
    otherwise land in front of the subcommand.
    """
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError("the `deepspeed` launcher is not installed: pip install deepspeed")
    return [
        launcher,
        "--num_gpus", str(num_procs),
        "--master_port", str(master_port or free_port()),
        "--no_local_rank",
        "--module", "megadual",
        *megadual_args,
    ]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_deepspeed(num_procs: int, megadual_args: Sequence[str], timeout: float, log_path: Optional[str] = None) -> None:
    """Run a launch to completion; its output goes to `log_path` (or is inherited).

    Raises:
        RuntimeError: the launch failed or ran past `timeout` seconds (then it is killed).
    """
    cmd = deepspeed_command(num_procs, megadual_args)
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    # Own session: on timeout the whole tree (launcher and every rank) is killed together.
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"`{' '.join(cmd)}` ran past {timeout:.0f} s; see {log_path or 'its output'}") from exc
    finally:
        if log:
            log.close()
    if returncode != 0:
        tail = ""
        if log_path:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {returncode}\n{tail}")
