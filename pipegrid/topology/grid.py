"""The process grid as pure math: ranks <-> named coordinates on N axes.

No torch, no pipegrid imports: the planner, the schedules and the tests use it freely.
"""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from typing import Any, NamedTuple


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return value


class ProcessTopology:
    """An N-D grid of ranks with named axes; the last axis varies fastest.

    ``rank = sum(coord[i] * stride[i])`` with ``stride[-1] == 1``, the layout of
    ``torch.arange(world).view(*dims)``.
    """

    def __init__(self, axes: list[str], dims: list[int]) -> None:
        axes, dims = list(axes), list(dims)
        if len(axes) != len(dims):
            raise ValueError(f"axes and dims must have the same length, got {axes} and {dims}")
        if not axes:
            raise ValueError("a topology needs at least one axis, got axes=[]")
        for axis in axes:
            if not isinstance(axis, str) or not axis.isidentifier():
                raise ValueError(f"axis names must be identifiers, got {axis!r}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis names must be unique, got {axes}")
        self.axes: list[str] = axes
        self.dims: list[int] = [_check_positive_int(f"size of axis {a!r}", d) for a, d in zip(axes, dims)]
        self.world_size: int = math.prod(self.dims)
        self._strides = [math.prod(self.dims[i + 1:]) for i in range(len(self.dims))]
        self.Coord = namedtuple("Coord", axes)  # type: ignore[misc]

    # --- rank <-> coordinate -------------------------------------------------
    def coord(self, rank: int) -> NamedTuple:
        """The named coordinate of ``rank``."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        return self.Coord(*((rank // s) % d for s, d in zip(self._strides, self.dims)))

    def rank(self, **coords: int) -> int:
        """The rank at a full coordinate, e.g. ``rank(pipe=1, data=0, tensor=1)``."""
        unknown = set(coords) - set(self.axes)
        if unknown:
            raise ValueError(f"unknown axis {sorted(unknown)}; this topology's axes are {self.axes}")
        missing = [a for a in self.axes if a not in coords]
        if missing:
            raise ValueError(f"rank() needs a coordinate on every axis; missing {missing} (axes {self.axes})")
        return sum(self._checked(a, coords[a]) * s for a, s in zip(self.axes, self._strides))

    def _checked(self, axis: str, value: Any) -> int:
        size = self.axis_size(axis)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise ValueError(f"coordinate {axis}={value!r} out of range: must be an integer in [0, {size})")
        return value

    def axis_size(self, axis: str) -> int:
        if axis not in self.axes:
            raise ValueError(f"unknown axis {axis!r}; this topology's axes are {self.axes}")
        return self.dims[self.axes.index(axis)]

    # --- groups --------------------------------------------------------------
    def axis_groups(self, axis: str) -> list[list[int]]:
        """Lists of ranks that differ only along ``axis``, each sorted, in rank order of their first member."""
        self.axis_size(axis)  # validates the name
        index = self.axes.index(axis)
        others = [range(d) for i, d in enumerate(self.dims) if i != index]
        groups = []
        for rest in itertools.product(*others):
            base = list(rest)
            members = []
            for k in range(self.dims[index]):
                full = base[:index] + [k] + base[index:]
                members.append(sum(c * s for c, s in zip(full, self._strides)))
            groups.append(members)
        return sorted(groups)

    def filter_match(self, **coords: int) -> list[int]:
        """All ranks whose coordinates equal the given ones (unnamed axes are free)."""
        for axis, value in coords.items():
            self._checked(axis, value)
        return [r for r in range(self.world_size)
                if all(getattr(self.coord(r), a) == v for a, v in coords.items())]

    # --- printing ------------------------------------------------------------
    def __repr__(self) -> str:
        sizes = ", ".join(f"{a}={d}" for a, d in zip(self.axes, self.dims))
        return f"{type(self).__name__}({sizes})"

    def __str__(self) -> str:
        header = ["rank", *self.axes]
        rows = [[str(r), *map(str, self.coord(r))] for r in range(self.world_size)]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([repr(self), line(header), *map(line, rows)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessTopology) and (self.axes, self.dims) == (other.axes, other.dims)

    def __hash__(self) -> int:
        return hash((tuple(self.axes), tuple(self.dims)))


class Coord(NamedTuple):
    """A rank's place on the 3-D grid."""

    pipe: int
    data: int
    tensor: int


class Topology(ProcessTopology):
    """The pipe x data x tensor grid: tensor fastest, pipe slowest (Megatron's order).

    ``rank = tensor + data * T + pipe * T * D``, so tensor-parallel peers are
    neighbours (same host) and pipeline neighbours are far apart.
    """

    def __init__(self, pipe: int = 1, data: int = 1, tensor: int = 1) -> None:
        super().__init__(["pipe", "data", "tensor"], [pipe, data, tensor])
        self.Coord = Coord  # type: ignore[misc]
        self.pipe, self.data, self.tensor = self.dims

    def __repr__(self) -> str:
        return f"Topology(pipe={self.pipe}, data={self.data}, tensor={self.tensor})"

    def coord(self, rank: int) -> Coord:
        return super().coord(rank)  # type: ignore[return-value]

    def pipe_rank(self, rank: int) -> int:
        """The pipe rank (pipe coordinate) of global rank ``rank``."""
        return self.coord(rank).pipe

    def is_first_in_pipe(self, rank: int) -> bool:
        return self.pipe_rank(rank) == 0

    def is_last_in_pipe(self, rank: int) -> bool:
        return self.pipe_rank(rank) == self.pipe - 1

    def next_rank(self, rank: int) -> int | None:
        """The next pipe rank's global rank at the same data/tensor coordinate (None on the last)."""
        c = self.coord(rank)
        return None if c.pipe == self.pipe - 1 else self.rank(pipe=c.pipe + 1, data=c.data, tensor=c.tensor)

    def prev_rank(self, rank: int) -> int | None:
        """The previous pipe rank's global rank at the same data/tensor coordinate (None on the first)."""
        c = self.coord(rank)
        return None if c.pipe == 0 else self.rank(pipe=c.pipe - 1, data=c.data, tensor=c.tensor)

    def pipe_peer(self, rank: int, pipe_rank: int) -> int:
        """The global rank at pipe rank ``pipe_rank`` on ``rank``'s data/tensor coordinate."""
        c = self.coord(rank)
        return self.rank(pipe=pipe_rank, data=c.data, tensor=c.tensor)
