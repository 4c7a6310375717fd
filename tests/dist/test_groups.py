"""ProcessGroups on real gloo ranks: data groups reduce over data peers only."""

import pytest
import torch
import torch.distributed as dist

from pipegrid.launch import WorkerError, run_local
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups, check_world_size


def _groups_report():
    groups = ProcessGroups(Topology(pipe=2, data=2), timeout_s=30)
    rank = dist.get_rank()
    value = torch.tensor([10.0 ** rank])
    dist.all_reduce(value, group=groups.data_parallel_group)
    pipe_value = torch.tensor([10.0 ** rank])
    dist.all_reduce(pipe_value, group=groups.pipe_parallel_group)
    return {"data_sum": value.item(), "pipe_sum": pipe_value.item(), "next": groups.next_rank,
            "prev": groups.prev_rank, "stage": groups.pipe_rank, "data": groups.axis_ranks["data"],
            "tensor_group": groups.tensor_parallel_group}


def test_data_group_all_reduce_sums_exactly_the_data_peers():
    results = run_local(_groups_report, 4, timeout_s=60)
    # ranks: (pipe, data) = 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1)
    assert [r["data_sum"] for r in results] == [11.0, 11.0, 1100.0, 1100.0]
    assert [r["pipe_sum"] for r in results] == [101.0, 1010.0, 101.0, 1010.0]
    assert [r["next"] for r in results] == [2, 3, None, None]
    assert [r["prev"] for r in results] == [None, None, 0, 1]
    assert [r["stage"] for r in results] == [0, 0, 1, 1]
    assert [r["data"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r["tensor_group"] is None for r in results)  # tensor=1: no group needed


def _wrong_world():
    ProcessGroups(Topology(pipe=2, data=2, tensor=2))


def test_world_size_mismatch_is_named_before_any_collective():
    with pytest.raises(WorkerError, match=r"ValueError: .*needs 8 processes .*got WORLD_SIZE=2.*start 8 processes"):
        run_local(_wrong_world, 2, timeout_s=30)


def test_check_world_size_message():
    with pytest.raises(ValueError, match=r"pipe=2 x data=2 x tensor=1\), got WORLD_SIZE=3"):
        check_world_size(Topology(pipe=2, data=2), 3)
