"""The 2-rank harness itself: results, collectives, and every way a rank can fail."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from tests._dist import RankError, run_distributed


def _all_reduce_sum(rank, world_size):
    t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
    dist.all_reduce(t)
    return t.tolist()


def _identity(rank, world_size, tag):
    return {
        "rank": rank,
        "tag": tag,
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
        "threads": torch.get_num_threads(),
        "dist_rank": dist.get_rank(),
    }


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the test")
    # Rank 0 blocks in a collective its failed peer never joins: the harness must not wait for it.
    dist.barrier()
    return rank


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(60)
    return rank


def _hang_deep_on_rank1(rank, world_size, depth=0):
    # Deep enough that the stack dump outgrows the harness's cap: the report must keep the
    # frame where the rank hangs, not the frames below it.
    if depth < 80:
        return _hang_deep_on_rank1(rank, world_size, depth + 1)
    return _hang_on_rank1(rank, world_size)


def _exit_on_rank0(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_all_reduce_sums_across_ranks():
    assert run_distributed(_all_reduce_sum, world_size=2) == [[3.0, 30.0], [3.0, 30.0]]


def test_return_values_in_rank_order_with_env_and_one_thread():
    env_before = dict(os.environ)
    out = run_distributed(_identity, world_size=2, args=("x",))
    assert [o["rank"] for o in out] == [0, 1]
    assert [o["dist_rank"] for o in out] == [0, 1]
    assert out[1]["env"] == ("1", "1", "2")
    assert all(o["tag"] == "x" and o["threads"] == 1 for o in out)
    # Everything was set in the children only.
    assert dict(os.environ) == env_before
    assert not dist.is_initialized()


def test_raising_rank_surfaces_in_parent_with_rank_and_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 raised ValueError: boom from the test") as info:
        run_distributed(_raise_on_rank1, world_size=2, timeout=30)
    err = info.value
    assert err.rank == 1 and err.exc_type == "ValueError"
    assert "_raise_on_rank1" in str(err)  # the child's traceback is in the message
    assert isinstance(err.__cause__, ValueError)
    # The peer stuck in barrier() was killed after a short grace, not after the timeout.
    assert time.monotonic() - start < 15


def test_hanging_rank_times_out_naming_it():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 did not finish") as info:
        run_distributed(_hang_deep_on_rank1, world_size=2, timeout=3)
    assert time.monotonic() - start < 10
    assert "_hang_on_rank1" in str(info.value)


def test_rank_dying_without_report_gives_exit_code():
    with pytest.raises(RankError, match=r"rank 0 exited with code 3 without reporting"):
        run_distributed(_exit_on_rank0, world_size=2, timeout=30)


def _killed_on_rank1(rank, world_size):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would; no Python cleanup runs
    dist.barrier()  # rank 0 then fails with "connection reset": a consequence, not the cause
    return rank


def test_killed_rank_is_reported_as_the_cause():
    with pytest.raises(RankError, match=r"^rank 1 was killed by SIGKILL without reporting") as info:
        run_distributed(_killed_on_rank1, world_size=2, timeout=30)
    assert info.value.exitcode == -signal.SIGKILL


def _tensors(rank, world_size):
    w = torch.ones(3, requires_grad=True)
    return {"plain": torch.arange(4.0) * rank, "grad_graph": w * 2, "big": torch.full((256, 256), float(rank))}


def test_tensors_come_back_by_value():
    # Results are plain-pickled, so they survive the rank's exit (no shared-memory handles).
    out = run_distributed(_tensors, world_size=2)
    assert torch.equal(out[1]["plain"], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(out[1]["grad_graph"].detach(), torch.full((3,), 2.0))
    assert out[0]["big"].sum().item() == 0 and out[1]["big"].sum().item() == 256 * 256
