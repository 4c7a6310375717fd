"""torch.distributed process groups for every axis of a Topology.

One object, passed around (no global singleton), answers "my data group, my pipe
group, my tensor group, my pipeline neighbours" for the calling rank.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from pipegrid.topology.grid import Topology

_AXES = ("pipe", "data", "tensor")


def check_world_size(topology: Topology, world_size: int) -> None:
    """Raise before any collective when the world cannot hold the topology."""
    if world_size != topology.world_size:
        raise ValueError(
            f"topology needs {topology.world_size} processes (pipe={topology.pipe} x "
            f"data={topology.data} x tensor={topology.tensor}), got WORLD_SIZE={world_size}; "
            f"change topology.pipe/data/tensor so their product is {world_size} "
            f"or start {topology.world_size} processes")


class ProcessGroups:
    """The process groups of ``topology`` for the calling rank.

    Every rank creates every group in the same order, as ``new_group`` requires,
    and keeps only handles to the groups it belongs to. Each group gets the
    timeout so a dead peer turns into an error instead of a hang.
    """

    def __init__(self, topology: Topology, timeout_s: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroups needs torch.distributed to be initialised first; "
                               "call pipegrid.initialize(...) or torch.distributed.init_process_group(...)")
        check_world_size(topology, dist.get_world_size())
        self.topology = topology
        self.rank = dist.get_rank()
        self.coord = topology.coord(self.rank)
        self.timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        self.axis_ranks: dict[str, list[int]] = {}
        self.axis_group: dict[str, dist.ProcessGroup | None] = {}
        for axis in _AXES:
            for ranks in topology.axis_groups(axis):
                group = self.new_group(ranks)
                if self.rank in ranks:
                    self.axis_ranks[axis], self.axis_group[axis] = ranks, group

    def new_group(self, ranks: list[int]) -> dist.ProcessGroup | None:
        """A group over ``ranks`` (cached). Collective: every rank must call it in the same order.

        Returns None for a one-rank group, where collectives are no-ops.
        """
        key = tuple(sorted(ranks))
        if key not in self._groups:
            if len(key) == dist.get_world_size() > 1:
                # the whole world: reuse the default group. Every extra gloo group runs its
                # own transport threads, which cost ~2 ms per step on the 2-core benchmark
                group = dist.group.WORLD
            else:
                group = dist.new_group(list(key), timeout=self.timeout) if len(key) > 1 else None
            self._groups[key] = group if self.rank in key else None
        return self._groups[key]

    # --- the calling rank's view ---------------------------------------------
    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.axis_group["data"]

    @property
    def pipe_parallel_group(self) -> dist.ProcessGroup | None:
        return self.axis_group["pipe"]

    @property
    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        return self.axis_group["tensor"]

    @property
    def pipe_rank(self) -> int:
        """This rank's place along the pipe axis (0 runs the first model stage)."""
        return self.coord.pipe

    @property
    def next_rank(self) -> int | None:
        return self.topology.next_rank(self.rank)

    @property
    def prev_rank(self) -> int | None:
        return self.topology.prev_rank(self.rank)

    def pipe_peer(self, pipe_rank: int) -> int:
        """Global rank of pipe rank ``pipe_rank`` at this rank's data/tensor coordinate."""
        return self.topology.pipe_peer(self.rank, pipe_rank)

    def __repr__(self) -> str:
        return (f"ProcessGroups(rank={self.rank}, coord={tuple(self.coord)}, "
                f"data={self.axis_ranks['data']}, pipe={self.axis_ranks['pipe']}, "
                f"tensor={self.axis_ranks['tensor']})")
