"""Who talks to whom: the process grid (pure math), its torch.distributed groups,
and the placement of the grid onto a cluster graph."""

from pipegrid.topology.grid import Coord, ProcessTopology, Topology

__all__ = ["Coord", "ProcessTopology", "Topology"]
