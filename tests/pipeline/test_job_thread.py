"""The extraction's writer thread: jobs in order, a bounded queue, errors handed back."""

import threading

import pytest

from megadual.pipeline.job_thread import JobThread


def test_jobs_run_in_order_on_another_thread():
    done, threads = [], set()
    jobs = JobThread(max_pending=2)
    for i in range(50):
        jobs.submit(lambda i: (done.append(i), threads.add(threading.get_ident())), i)
    jobs.close()
    assert done == list(range(50)) and threads and threading.get_ident() not in threads


def test_submit_blocks_while_the_queue_is_full():
    gate = threading.Event()
    jobs = JobThread(max_pending=2)
    jobs.submit(gate.wait)  # running: holds the thread
    jobs.submit(lambda: None)
    jobs.submit(lambda: None)  # the queue now holds 2
    blocked = threading.Thread(target=jobs.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive(), "a third waiting job must block the submitter"
    gate.set()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    jobs.close()


def test_a_failed_job_drops_the_later_ones_and_raises_in_the_submitter():
    ran = []
    jobs = JobThread(max_pending=4)
    jobs.submit(ran.append, 1)
    jobs.submit(lambda: 1 / 0)
    jobs.submit(ran.append, 3)  # may be queued before the failure is seen: must not run
    with pytest.raises(ZeroDivisionError):
        for _ in range(1000):  # the error surfaces at the latest in close()
            jobs.submit(ran.append, 4)
        jobs.close()
    jobs.close(raise_errors=False)
    assert ran == [1]
    with pytest.raises(RuntimeError, match="after close"):
        jobs.submit(ran.append, 5)
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        JobThread(max_pending=0)
