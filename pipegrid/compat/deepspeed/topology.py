"""DeepSpeed's ProcessTopology API (get_rank, get_coord, filter_match...) over pipegrid's grid math.

DeepSpeed scripts build ``PipeDataParallelTopology(num_pp, num_dp)`` or
``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``; both lay ranks out pipe-major,
then data, then model, which is pipegrid's Topology(pipe, data, tensor): ``to_topology``.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from typing import Any

from pipegrid.topology import grid

__all__ = ["PipeDataParallelTopology", "PipeModelDataParallelTopology", "ProcessTopology", "as_topology"]

_PIPEGRID_AXIS = {"pipe": "pipe", "data": "data", "model": "tensor", "tensor": "tensor"}
_ORDER = ("pipe", "data", "tensor")


class ProcessTopology:
    """Named axes over ranks, the last axis fastest (DeepSpeed's ``deepspeed.pipe.ProcessTopology``)."""

    def __init__(self, axes: list[str], dims: list[int]) -> None:
        self._grid = grid.ProcessTopology(list(axes), list(dims))  # checks names and sizes
        self.axes, self.dims = list(axes), list(dims)
        self.ProcessCoord = namedtuple("ProcessCoord", self.axes)  # type: ignore[misc]
        self.mapping = {self.ProcessCoord(*coord): rank for rank, coord in
                        enumerate(itertools.product(*(range(d) for d in self.dims)))}

    def get_rank(self, **coord_kwargs: int) -> int:
        if len(coord_kwargs) != len(self.axes):
            raise ValueError("get_rank() does not support slices. Use filter_match())")
        return self._grid.rank(**coord_kwargs)

    def get_axis_names(self) -> list[str]:
        return self.axes

    def get_rank_repr(self, rank: int, omit_axes: Any = ("data", "pipe"), inner_sep: str = "_",
                      outer_sep: str = "-") -> str:
        """``'model_01'``-style name of a rank's coordinate on the axes not omitted (for file names)."""
        coord = self.get_coord(rank)
        return outer_sep.join(f"{axis}{inner_sep}{getattr(coord, axis):02d}"
                              for axis in self.axes if axis not in set(omit_axes))

    def get_dim(self, axis: str) -> int:
        """Size of ``axis``; 0 when the topology has no such axis (DeepSpeed's convention)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_coord(self, rank: int) -> Any:
        return self.ProcessCoord(*self._grid.coord(rank))

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """Rank lists that differ only along ``axis``, in DeepSpeed's order (other axes row-major)."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for values in itertools.product(*(range(self.get_dim(a)) for a in others)):
            fixed = dict(zip(others, values))
            lists.append([self._grid.rank(**fixed, **{axis: k}) for k in range(self.get_dim(axis))])
        return lists

    def filter_match(self, **filter_kwargs: int) -> list[int]:
        return self._grid.filter_match(**filter_kwargs)

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        return self._grid.filter_match(**{axis: idx})

    def world_size(self) -> int:
        return self._grid.world_size

    def __str__(self) -> str:
        return str(self.mapping)

    def to_topology(self) -> grid.Topology:
        """pipegrid's Topology with the same rank layout; refuses axes it cannot express."""
        names = [_PIPEGRID_AXIS.get(axis) for axis in self.axes]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"pipegrid runs topologies over the axes pipe, data and model (tensor), got "
                             f"{self.axes}; use PipeDataParallelTopology or PipeModelDataParallelTopology")
        order = [_ORDER.index(n) for n, d in zip(names, self.dims) if d > 1]
        if order != sorted(order):
            raise ValueError(f"pipegrid lays ranks out pipe-major, then data, then model (tensor fastest), but "
                             f"axes {self.axes} with sizes {self.dims} order them differently; list the axes "
                             "as ['pipe', 'data', 'model']")
        sizes = dict(zip(names, self.dims))
        return grid.Topology(pipe=sizes.get("pipe", 1), data=sizes.get("data", 1), tensor=sizes.get("tensor", 1))


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism, data fastest."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x model (tensor) parallelism, model fastest."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


def as_topology(topology: Any) -> grid.Topology:
    """A DeepSpeed-style or pipegrid topology as pipegrid's Topology."""
    if isinstance(topology, grid.Topology):
        return topology
    if isinstance(topology, ProcessTopology):
        return topology.to_topology()
    if isinstance(topology, grid.ProcessTopology):
        return ProcessTopology(topology.axes, topology.dims).to_topology()
    raise TypeError(f"topology must be a deepspeed.pipe ProcessTopology (e.g. PipeDataParallelTopology) or a "
                    f"pipegrid.Topology, got {type(topology).__name__}")
