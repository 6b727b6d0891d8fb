"""Run a function on several gloo ranks in forked processes: real collectives in a unit test.

    from tests._dist import run_distributed

    def _body(rank, world_size, scale):
        t = torch.full((2,), float(rank + 1) * scale)
        dist.all_reduce(t)
        return t.tolist()

    def test_sum():
        assert run_distributed(_body, world_size=2, args=(2.0,)) == [[6.0, 6.0]] * 2

Each rank is a `fork` of the test process (about 0.2 s; `spawn` would re-import torch,
about 15 s on 2 cores). A rank gets RANK / LOCAL_RANK / WORLD_SIZE in its environment,
one intra-op thread, and a gloo process group rendezvousing through a FileStore in a
private temp directory (no ports, so parallel test runs cannot collide).

Failures are reported in the parent, never left hanging:

* a rank that raises -> `RankError` naming the rank, with the child's traceback in the
  message (the original exception is its `__cause__` when it could be pickled). When
  several ranks fail, the earliest failure is reported and the others are listed after
  it (a peer's "connection closed" is a consequence, not the cause). The other ranks get a short grace to finish (they are often blocked in a collective
  with the failed rank) and are then killed;
* a rank that dies without reporting (`os._exit`, a segfault, the OOM killer) ->
  `RankError` with its exit code or signal;
* a run longer than `timeout` -> every rank is killed and `TimeoutError` names the
  ranks that had not finished, with their Python stacks at the moment of the timeout.

The parent's environment and process-group state are untouched: everything is set in
the children only.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing import connection
from typing import Any, Callable, Sequence

# How long the other ranks may keep running after one rank failed before they are killed.
# A healthy peer of a failed rank usually sits in a collective that will never complete.
FAILURE_GRACE_S = 2.0
# Between SIGTERM and SIGKILL when stopping ranks.
KILL_GRACE_S = 1.0
# How long to let a hung rank write its stack after SIGUSR1.
STACK_DUMP_WAIT_S = 0.3
_MAX_STACK_CHARS = 4000


class RankError(RuntimeError):
    """A rank raised or died.

    Attributes:
        rank: the failing rank.
        exc_type: the exception's class name, or None if the rank died without raising.
        remote_traceback: the child's formatted traceback ('' if it died without raising).
        exitcode: the process exit code (negative: killed by that signal), or None.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        exc_type: str | None = None,
        remote_traceback: str = "",
        exitcode: int | None = None,
    ):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    timeout: float = 120.0,
    args: Sequence[Any] = (),
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` forked gloo ranks.

    Args:
        fn: the per-rank body. It runs with the default process group initialised;
            its return value must be picklable. A module-level function or a closure
            both work (fork does not pickle `fn`).
        world_size: number of ranks (processes).
        timeout: seconds for the whole run, rendezvous included. Keep it short in
            tests that expect a hang.
        args: extra positional arguments passed to every rank.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        RankError: a rank raised (lowest failing rank reported; message holds the
            child's traceback) or exited without reporting a result.
        TimeoutError: `timeout` passed; the message names the unfinished ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}, expected a positive integer")
    ctx = mp.get_context("fork")
    workdir = tempfile.mkdtemp(prefix="megadual-dist-")
    store_path = os.path.join(workdir, "store")
    procs: list[mp.process.BaseProcess] = []
    conns: list[connection.Connection] = []
    try:
        with warnings.catch_warnings():
            # Python warns that fork() in a multi-threaded process may deadlock; each child
            # only runs fn with one intra-op thread and talks through gloo, so that is accepted.
            warnings.simplefilter("ignore", DeprecationWarning)
            for rank in range(world_size):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_child_main,
                    args=(fn, rank, world_size, tuple(args), store_path, workdir, timeout, send),
                    name=f"megadual-rank{rank}",
                    daemon=True,
                )
                p.start()
                # Close our copy of the write end so later forks do not inherit it.
                send.close()
                procs.append(p)
                conns.append(recv)
        return _collect(procs, conns, workdir, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                _stop(procs)
                break
        for c in conns:
            c.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _child_main(fn, rank, world_size, args, store_path, workdir, timeout, send) -> None:
    """Body of one forked rank: set up, run fn, report ('ok', value) or ('error', ...)."""
    # Kept open for the life of the process: faulthandler writes into it on SIGUSR1.
    stack_file = open(os.path.join(workdir, f"stack.{rank}"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    group_up = False
    try:
        import torch
        import torch.distributed as dist

        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        # The gloo timeout makes a collective with a dead peer fail in the child too, so a
        # forgotten kill never leaves an orphan spinning forever.
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=max(timeout, 1.0))
        )
        group_up = True
        result = fn(rank, world_size, *args)
        try:
            payload = pickle.dumps(("ok", result))
        except Exception as exc:  # an unpicklable result is the test's bug: say so plainly
            raise TypeError(f"rank {rank}: the return value of {fn!r} could not be pickled: {exc}") from exc
        _send(send, payload)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        # CLOCK_MONOTONIC is system-wide on Linux, so the parent can order failures across
        # ranks and report the root cause, not a peer's "connection closed" that followed it.
        failed_at = time.monotonic()
        tb = traceback.format_exc()
        try:
            # Pickled here so that an exception that will not pickle still reports its text.
            exc_bytes = pickle.dumps(exc)
        except Exception:
            exc_bytes = None
        _send(send, pickle.dumps(("error", failed_at, type(exc).__name__, str(exc), tb, exc_bytes)))
    finally:
        if group_up:
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass
        send.close()


def _send(conn: connection.Connection, payload: bytes) -> None:
    # Plain pickle bytes, not Connection.send: with torch imported, multiprocessing's pickler
    # shares tensors through file descriptors served by this process, which is about to exit.
    conn.send_bytes(payload)


def _collect(procs, conns, workdir: str, timeout: float) -> list[Any]:
    """Wait for every rank's report or death; enforce the timeout and the failure grace."""
    world_size = len(procs)
    results: dict[int, Any] = {}
    errors: dict[int, RankError] = {}
    failed_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    failure_deadline: float | None = None
    pending = set(range(world_size))

    while pending:
        now = time.monotonic()
        limit = deadline if failure_deadline is None else min(deadline, failure_deadline)
        if now >= limit:
            break
        waitables = {}
        for r in pending:
            waitables[conns[r]] = r
            waitables[procs[r].sentinel] = r
        ready = connection.wait(list(waitables), timeout=limit - now)
        for obj in ready:
            r = waitables[obj]
            if r not in pending:
                continue
            report = _read_report(conns[r])
            if report is None:
                # Sentinel fired with nothing in the pipe: the rank died without reporting.
                if procs[r].is_alive():
                    continue  # EOF on the pipe but still running: wait for the sentinel
                procs[r].join()
                errors[r] = _died_error(r, procs[r].exitcode)
                # When it died is unknown (we only see it now); a peer that merely lost its
                # connection reports an exception instead of dying, so a death ranks first.
                failed_at[r] = float("-inf")
            elif report[0] == "ok":
                results[r] = report[1]
            else:
                failed_at[r] = report[1]
                errors[r] = _raised_error(r, *report[2:])
            pending.discard(r)
            if r in errors and failure_deadline is None:
                failure_deadline = time.monotonic() + FAILURE_GRACE_S

    if errors:
        _stop(procs)
        # The earliest failure is the cause; later ones are usually peers losing their connection.
        first = min(errors, key=lambda r: (failed_at[r], r))
        err = errors[first]
        extra = [
            f"then {str(errors[r]).splitlines()[0][:200]}"
            for r in sorted(set(errors) - {first}, key=lambda r: (failed_at[r], r))
        ]
        if pending:
            extra.append(f"ranks {sorted(pending)} were still running and were killed")
        if extra:
            err.args = (err.args[0] + "".join(f"\n({e})" for e in extra),)
        raise err
    if pending:
        stacks = _dump_stacks(procs, sorted(pending), workdir)
        _stop(procs)
        raise TimeoutError(
            f"run_distributed: ranks {sorted(pending)} of {world_size} did not finish within {timeout:g} s "
            f"(finished: {sorted(results)}); all ranks were killed.{stacks}"
        )
    for p in procs:
        p.join(KILL_GRACE_S * 5)
    _stop(procs)
    return [results[r] for r in range(world_size)]


def _read_report(conn: connection.Connection):
    """One report from a rank's pipe, or None if the rank closed it without sending."""
    try:
        if conn.poll():
            return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        pass
    return None


def _raised_error(rank: int, exc_type: str, text: str, tb: str, exc_bytes: bytes | None) -> RankError:
    original = None
    if exc_bytes is not None:
        try:
            original = pickle.loads(exc_bytes)
        except Exception:  # e.g. an exception class whose __init__ needs other arguments
            original = None
    err = RankError(
        f"rank {rank} raised {exc_type}: {text}\n--- traceback on rank {rank} ---\n{tb.rstrip()}",
        rank=rank,
        exc_type=exc_type,
        remote_traceback=tb,
    )
    err.__cause__ = original
    return err


def _died_error(rank: int, exitcode: int | None) -> RankError:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return RankError(f"rank {rank} {how} without reporting a result", rank=rank, exitcode=exitcode)


def _dump_stacks(procs, ranks: list[int], workdir: str) -> str:
    """Ask hung ranks for their Python stacks (faulthandler on SIGUSR1) and format them."""
    for r in ranks:
        if procs[r].is_alive() and procs[r].pid is not None:
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(STACK_DUMP_WAIT_S)
    parts = []
    for r in ranks:
        try:
            with open(os.path.join(workdir, f"stack.{r}")) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text:
            # faulthandler prints the most recent call first, so the head is the part that says
            # where the rank hangs; the tail is pytest's and multiprocessing's frames.
            parts.append(f"\n--- stack of rank {r} at the timeout ---\n{text[:_MAX_STACK_CHARS]}")
    return "".join(parts)


def _stop(procs) -> None:
    """SIGTERM every live rank, then SIGKILL whatever is left after a grace."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + KILL_GRACE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
