"""The local multi-process harness: results, tracebacks, dead ranks, timeouts."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from pipegrid.launch import WorkerError, run_local


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item(), os.environ["OMP_NUM_THREADS"]


def test_returns_each_ranks_result():
    results = run_local(_rank_and_sum, 3, timeout_s=30)
    assert results == [(0, 6.0, "1"), (1, 6.0, "1"), (2, 6.0, "1")]


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom from a helpful place")
    dist.barrier()  # rank 0 would block here forever without the harness
    return "unreachable"


def test_raising_rank_shows_its_traceback():
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_local(_raise_on_rank_one, 2, timeout_s=30)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1 raised" in message and "ValueError: boom from a helpful place" in message
    assert "_raise_on_rank_one" in message  # the traceback, not only the message
    assert time.monotonic() - start < 15


def _killed_rank():
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def test_killed_rank_ends_the_run_quickly():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 0 was killed by signal 9"):
        run_local(_killed_rank, 2, timeout_s=60)
    assert time.monotonic() - start < 15


def _hang():
    time.sleep(60)


def test_timeout_kills_a_hung_run():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_local(_hang, 2, timeout_s=2, backend=None)
    assert time.monotonic() - start < 10
