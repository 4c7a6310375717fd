"""Who talks to whom: the process grid (pure math), its torch.distributed groups,
and the cluster graph the grid is placed onto (``topology.cluster``)."""

from pipegrid.topology.grid import Coord, ProcessTopology, Topology

__all__ = ["Coord", "ProcessTopology", "Topology"]
