"""Start `megadual` subcommands as child processes: on several local ranks with the
`deepspeed` launcher, or as one plain process; output kept in a log and optionally echoed.

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
import threading
from typing import Optional, Sequence

from megadual.distributed.runtime import free_port


def deepspeed_launcher() -> str:
    """The `deepspeed` executable beside this interpreter (its venv), else on PATH."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError("the `deepspeed` launcher is not installed: pip install deepspeed")
    return launcher


def deepspeed_command(num_procs: int, megadual_args: Sequence[str], master_port: Optional[int] = None) -> list[str]:
    """`deepspeed --num_gpus N --master_port P --no_local_rank --module megadual ARGS...`.

    `--num_gpus` also sets the number of CPU ranks on DeepSpeed's CPU accelerator;
    `--no_local_rank` because ranks read LOCAL_RANK from the environment, and the flag would
    otherwise land in front of the subcommand.
    """
    return [
        deepspeed_launcher(),
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


def run_deepspeed(num_procs: int, megadual_args: Sequence[str], timeout: float, log_path: Optional[str] = None,
                  echo: bool = False) -> None:
    """Run a launch to completion (see `run_command`)."""
    run_command(deepspeed_command(num_procs, megadual_args), timeout, log_path, echo)


def megadual_command(megadual_args: Sequence[str]) -> list[str]:
    """`python -m megadual ARGS...` with this interpreter: one process, no launcher."""
    return [sys.executable, "-m", "megadual", *megadual_args]


def run_command(cmd: Sequence[str], timeout: float, log_path: Optional[str] = None, echo: bool = False) -> None:
    """Run `cmd` to completion; its output goes to `log_path` (or is inherited).

    Args:
        echo: with a log, also copy the output to this process's stderr as it comes
            (progress bars stay visible while the log keeps everything).

    Raises:
        RuntimeError: the command failed or ran past `timeout` seconds (then it is killed).
    """
    cmd = list(cmd)
    log = open(log_path, "wb") if log_path else None
    # Own session: on timeout the whole tree (launcher and every rank) is killed together.
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE if log else None,
                            stderr=subprocess.STDOUT if log else None, start_new_session=True)
    pump = None
    if log:
        pump = threading.Thread(target=_copy_output, args=(proc.stdout, log, sys.stderr.buffer if echo else None),
                                daemon=True)
        pump.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"`{' '.join(cmd)}` ran past {timeout:.0f} s; see {log_path or 'its output'}") from exc
    finally:
        if pump:
            pump.join()
            log.close()
    if returncode != 0:
        tail = ""
        if log_path:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {returncode}\n{tail}")


def _copy_output(source, log, echo) -> None:
    """Copy a child's output to its log (and to `echo`) until it closes."""
    # read1: whatever is there now, so a progress bar's carriage-return updates pass at once.
    while chunk := source.read1(65536):
        log.write(chunk)
        if echo is not None:
            echo.write(chunk)
            echo.flush()
    source.close()
