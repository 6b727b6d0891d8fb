"""One background thread that runs submitted jobs in order, with a bounded queue.

Extraction hands the serialization and writing of token shards to such a thread, so the
tokenizer forward of batch k+1 runs while batch k is encoded into tar bytes and written
(torch releases the GIL inside its ops, and the file writes release it too).

    jobs = JobThread(max_pending=8, name="extract-writer")
    jobs.submit(add_batch, shard, codes)     # blocks while 8 jobs wait: memory stays bounded
    jobs.close()                             # runs what is queued, then re-raises a job's error

Jobs run one at a time in submission order. After a job raises, the later jobs are dropped
(a shard must not be finished without the batch that failed) and the error is raised in the
submitting thread by the next `submit` or by `close`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Optional

_STOP = object()


class JobThread:
    """Runs `fn(*args)` jobs in order on one daemon thread.

    Args:
        max_pending: jobs that may wait in the queue before `submit` blocks (>= 1).
        name: the thread's name (shows in stack dumps).

    Raises:
        ValueError: max_pending < 1.
    """

    def __init__(self, max_pending: int, name: str = "job-thread"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._closed = False
        self.cpu_s = 0.0  # CPU seconds the thread used, set when it stops
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        started = time.thread_time()
        while True:
            job = self._queue.get()
            if job is _STOP:
                self.cpu_s = time.thread_time() - started
                return
            if self._error is None:  # after a failure, drain without running
                fn, args = job
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the submitting thread
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; blocks while the queue is full.

        Raises:
            RuntimeError: the thread was closed.
            BaseException: the error of an earlier job.
        """
        if self._closed:
            raise RuntimeError("JobThread.submit after close()")
        self._raise_error()
        self._queue.put((fn, args))

    def close(self, raise_errors: bool = True) -> None:
        """Run the queued jobs, stop the thread, and (unless told not to) re-raise a job's error."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if raise_errors:
            self._raise_error()
