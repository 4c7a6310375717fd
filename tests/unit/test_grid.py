"""The process grid: rank <-> coordinate round trips, groups, and bad input."""

import itertools

import pytest

from pipegrid.topology.grid import ProcessTopology, Topology

SIZES = list(itertools.product(range(1, 5), repeat=3))


@pytest.mark.parametrize("pipe,data,tensor", SIZES)
def test_rank_coord_round_trip(pipe, data, tensor):
    topo = Topology(pipe=pipe, data=data, tensor=tensor)
    assert topo.world_size == pipe * data * tensor
    for rank in range(topo.world_size):
        c = topo.coord(rank)
        assert rank == c.tensor + c.data * tensor + c.pipe * tensor * data
        assert topo.rank(**c._asdict()) == rank


@pytest.mark.parametrize("pipe,data,tensor", SIZES)
def test_axis_groups_partition_the_world(pipe, data, tensor):
    topo = Topology(pipe=pipe, data=data, tensor=tensor)
    for axis in ("pipe", "data", "tensor"):
        groups = topo.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(topo.world_size))
        assert all(len(g) == topo.axis_size(axis) and g == sorted(g) for g in groups)
        for group in groups:  # members differ only along `axis`
            others = {tuple(v for a, v in topo.coord(r)._asdict().items() if a != axis) for r in group}
            assert len(others) == 1


def test_documented_examples():
    topo = Topology(pipe=2, data=2, tensor=2)
    assert topo.rank(pipe=1, data=0, tensor=1) == 5
    assert topo.axis_groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    small = Topology(pipe=2, data=2, tensor=1)
    assert small.coord(3) == (1, 1, 0) and small.coord(3).pipe == 1
    assert small.axis_groups("data") == [[0, 1], [2, 3]]
    assert small.axis_groups("pipe") == [[0, 2], [1, 3]]


def test_pipeline_neighbours():
    topo = Topology(pipe=3, data=2, tensor=1)
    assert [topo.pipe_rank(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert topo.next_rank(0) == 2 and topo.next_rank(3) == 5 and topo.next_rank(4) is None
    assert topo.prev_rank(5) == 3 and topo.prev_rank(1) is None
    assert topo.is_first_in_pipe(1) and topo.is_last_in_pipe(5) and not topo.is_last_in_pipe(2)


def test_filter_match_and_str():
    topo = Topology(pipe=2, data=2, tensor=2)
    assert topo.filter_match(pipe=1, tensor=0) == [4, 6]
    assert topo.filter_match() == list(range(8))
    text = str(topo)
    assert "pipe" in text and "tensor" in text and len(text.splitlines()) == 10
    assert repr(topo) == "Topology(pipe=2, data=2, tensor=2)"


def test_process_topology_n_axes():
    topo = ProcessTopology(["a", "b", "c", "d"], [2, 1, 3, 2])
    assert topo.world_size == 12
    assert topo.coord(1) == (0, 0, 0, 1)  # last axis fastest
    assert topo.rank(a=1, b=0, c=2, d=1) == 11
    assert topo == ProcessTopology(["a", "b", "c", "d"], [2, 1, 3, 2])


@pytest.mark.parametrize("dims,match", [
    ([0, 1, 1], "positive integer"), ([-1, 2, 1], "positive integer"), ([1.5, 1, 1], "positive integer"),
    ([True, 1, 1], "positive integer"),
])
def test_bad_dims(dims, match):
    with pytest.raises(ValueError, match=match):
        Topology(*dims)


def test_bad_axes_and_coordinates():
    with pytest.raises(ValueError, match="unique"):
        ProcessTopology(["pipe", "pipe"], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        ProcessTopology(["pipe"], [1, 1])
    topo = Topology(pipe=2, data=2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 4\), got 4"):
        topo.coord(4)
    with pytest.raises(ValueError, match=r"pipe=2 out of range.*\[0, 2\)"):
        topo.rank(pipe=2, data=0, tensor=0)
    with pytest.raises(ValueError, match="unknown axis"):
        topo.rank(pipe=0, data=0, tensor=0, expert=0)
    with pytest.raises(ValueError, match="missing"):
        topo.rank(pipe=0)
    with pytest.raises(ValueError, match="unknown axis 'expert'"):
        topo.axis_groups("expert")
