"""Devices and clusters for the planner: peak FLOP/s, memory, and link speeds.

Link bandwidths and latencies are read from ``topology.cluster.Cluster`` graphs (NVLink
inside a host, network between hosts); large homogeneous clusters are described by one
representative two-host graph, since every pair of devices is either same-host or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from pipegrid.topology.cluster import Cluster, default_mapping, place

__all__ = ["GEMM_EFFICIENCY", "DeviceSpec", "Link", "ClusterSpec"]

GEMM_EFFICIENCY = 0.7
"""Achieved fraction of peak FLOP/s for large GEMMs; ONE calibrated value for every
FLOP-derived prediction (fitted to Megatron's 1T run: with it, all ten rows of Narayanan et al. Table 1 come
out within 10% of the published fraction of peak; see the README)."""
_PLACE_LIMIT = 64  # above this many ranks, placement's swap search is too slow; use rank order


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or one CPU process)."""

    peak_flops: float
    """Peak dense FLOP/s in the training dtype (A100 bf16: 312e12)."""
    memory_bytes: float
    """Device memory in bytes."""
    memory_bandwidth: float
    """Device memory bandwidth in bytes/s (times memory-bound ops)."""
    gemm_efficiency: float = GEMM_EFFICIENCY
    """Achieved fraction of ``peak_flops`` for matrix multiplies."""
    slowdown: float = 1.0
    """Measured factor on measured layer times when all devices of a host compute at once
    (shared cores, memory bandwidth); 1 for dedicated accelerators."""
    host_link_bandwidth: float = 25e9
    """Bytes/s one device copies to or from pinned host memory (PCIe 4 x16 in practice; ZeRO-Offload)."""
    host_memory_bandwidth: float = 200e9
    """Bytes/s of the host's memory, shared by its devices' CPU optimizer steps (ZeRO-Offload)."""
    host_memory_bytes: float = 2048 * 2 ** 30
    """Host memory in bytes, shared by its devices (ZeRO-Offload keeps optimizer state there; a DGX
    A100 or H100 has 2 TiB)."""
    post_s: float = 0.0
    """Host seconds a rank spends posting one point-to-point transfer (CPU gloo: the send's
    copy into the socket and the peer's wake-up); 0 where a copy engine moves the data."""
    wake_s: float = 0.0
    """Seconds a message takes from a receive posted after its send (CPU gloo: the receiver asks,
    the sender's progress thread wakes on its busy core and writes); 0 where the data moves
    without the host. The simulator charges it only to receives posted late (``simulate`` wake)."""
    overlaps_comm: bool = True
    """Whether a collective posted from backward (ZeRO-2/3's bucket reductions,
    ``zero.reduce_every_micro_batch``) runs while the backward computes: True where NCCL has its own
    stream; False for CPU gloo, whose transfers take the cores the backward runs on (docs/zero.md)."""
    reduce_scatter_allreduces: bool = False
    """Whether a reduce-scatter costs a whole all-reduce of its input (CPU gloo, measured:
    ``benchmarks/hf_tp_speed.py --sequence-parallel``) rather than half of one, its ring share (NCCL).
    The planner prices sequence parallelism's reduce-scatters with it."""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes", "memory_bandwidth", "gemm_efficiency", "slowdown",
                     "host_link_bandwidth", "host_memory_bandwidth", "host_memory_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DeviceSpec.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.post_s, (int, float)) or not math.isfinite(self.post_s) or self.post_s < 0:
            raise ValueError(f"DeviceSpec.post_s must be a finite number >= 0, got {self.post_s!r}")
        if not isinstance(self.wake_s, (int, float)) or not math.isfinite(self.wake_s) or self.wake_s < 0:
            raise ValueError(f"DeviceSpec.wake_s must be a finite number >= 0, got {self.wake_s!r}")
        for name in ("overlaps_comm", "reduce_scatter_allreduces"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DeviceSpec.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Link:
    """A device-to-device path: bytes/s and seconds of latency."""

    bandwidth: float
    latency: float

    def time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` once over this link (0 for nothing to move)."""
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


@dataclass(frozen=True)
class ClusterSpec:
    """``hosts`` equal hosts of ``devices_per_host`` devices, as ``Cluster.homogeneous``."""

    name: str
    hosts: int
    devices_per_host: int
    device: DeviceSpec
    intra_gbytes_per_s: float
    """Bandwidth one device gets to a peer on its host (GB/s)."""
    inter_gbytes_per_s: float
    """Bandwidth one device gets to a peer on another host (GB/s)."""
    intra_latency_us: float = 2.0
    inter_latency_us: float = 5.0

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.devices_per_host < 1:
            raise ValueError(f"cluster {self.name}: hosts and devices_per_host must be >= 1, got "
                             f"{self.hosts} and {self.devices_per_host}")

    @property
    def num_devices(self) -> int:
        return self.hosts * self.devices_per_host

    def graph(self, hosts: int | None = None) -> Cluster:
        """The cluster graph (or that of its first ``hosts`` hosts)."""
        return Cluster.homogeneous(
            hosts or self.hosts, self.devices_per_host, intra_gbytes_per_s=self.intra_gbytes_per_s,
            inter_gbytes_per_s=self.inter_gbytes_per_s, intra_latency_us=self.intra_latency_us,
            inter_latency_us=self.inter_latency_us, device_flops=self.device.peak_flops,
            device_memory_bytes=self.device.memory_bytes)

    def links(self) -> tuple[Link, Link]:
        """(same host, across hosts), read from a two-host cluster graph."""
        return self._links

    @cached_property
    def _links(self) -> tuple[Link, Link]:
        probe = self.graph(hosts=min(self.hosts, 2))
        intra = Link(*probe.link((0, 0), (0, 1))) if self.devices_per_host > 1 else \
            Link(math.inf, 0.0)
        inter = Link(*probe.link((0, 0), (1, 0))) if self.hosts > 1 else intra
        return intra, inter

    def host_of_ranks(self, topology) -> list[int]:  # noqa: ANN001 - a ProcessTopology
        """Host of every rank: ``cluster.place`` for small grids, rank order otherwise."""
        if topology.world_size > self.num_devices:
            raise ValueError(f"{topology!r} needs {topology.world_size} devices; cluster "
                             f"{self.name} has {self.num_devices}")
        if topology.world_size <= _PLACE_LIMIT:
            graph = self.graph(hosts=math.ceil(topology.world_size / self.devices_per_host))
            devices = place(topology, graph) if self.num_devices > 1 else default_mapping(topology, graph)
            return [int(graph.host_of(d)) for d in devices]
        return [rank // self.devices_per_host for rank in range(topology.world_size)]

    def slowest_link(self, hosts: Sequence[int], groups: Sequence[Sequence[int]], ring: bool) -> Link:
        """The slowest hop of any group (a ring, or a chain for the pipe axis)."""
        intra, inter = self.links()
        crosses = False
        for group in groups:
            hops = zip(group, list(group[1:]) + ([group[0]] if ring else []))
            if any(hosts[a] != hosts[b] for a, b in hops if a != b):
                crosses = True
                break
        return inter if crosses else intra
