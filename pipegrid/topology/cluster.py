"""The cluster graph (hosts, devices, links) and the placement of the process grid onto it.

Pure networkx/numpy (no torch), so a planner can ask it for link bandwidths and latencies.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from types import MappingProxyType
from collections.abc import Hashable, Mapping, Sequence
from functools import cached_property

import networkx as nx
import numpy as np

from pipegrid.topology.grid import ProcessTopology

__all__ = ["Cluster", "communication_cost", "default_mapping", "place", "DEFAULT_WEIGHTS",
           "DEFAULT_MESSAGE_BYTES"]

Device = Hashable
DeviceMapping = Sequence[Device] | Mapping[int, Device]

DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType({"tensor": 100.0, "data": 10.0, "pipe": 1.0})
"""Relative traffic per hop: tensor-parallel collectives run every layer, data every step."""
DEFAULT_MESSAGE_BYTES: float = 2.0 ** 20
"""The reference message whose hop time (latency + bytes / bandwidth) the cost adds up."""
_CHAIN_AXES = frozenset({"pipe"})  # consecutive members talk, no wrap-around; other axes form rings


class Cluster:
    """A frozen copy of a cluster graph plus its device order and device-to-device links.

    Device nodes carry ``kind="device"`` and ``host`` (and optionally ``index``, ``flops``,
    ``memory_bytes``); any other node (host switch, fabric) only relays traffic. Every edge
    carries ``bandwidth`` in bytes/s and optionally ``latency`` in seconds (0 if missing).
    Devices are ordered host-major: hosts by first appearance, devices by ``index``.
    """

    def __init__(self, graph: nx.Graph) -> None:
        if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
            raise TypeError(f"a cluster is an undirected nx.Graph, got {type(graph).__name__}; "
                            "build it with nx.Graph() (convert with nx.Graph(g) if needed)")
        graph = graph.copy()
        self.devices: tuple[Device, ...] = _device_order(graph)
        _check_links(graph)
        _check_reachable(graph, self.devices)
        self.graph: nx.Graph = nx.freeze(graph)
        self._index = {device: i for i, device in enumerate(self.devices)}

    @classmethod
    def homogeneous(cls, hosts: int, devices_per_host: int, *, intra_gbytes_per_s: float,
                    inter_gbytes_per_s: float, intra_latency_us: float = 2.0,
                    inter_latency_us: float = 5.0, device_flops: float | None = None,
                    device_memory_bytes: float | None = None) -> Cluster:
        """``hosts`` equal hosts; devices ``(host, index)`` meet at a switch per host and,
        each through its own NIC, at one fabric switch joining the hosts.

        Bandwidths are GB/s (1e9 bytes/s) one device gets to one peer; latencies are end to end
        (microseconds): ``link`` between devices on one host gives exactly (intra bandwidth,
        intra latency), across hosts (min(intra, inter) bandwidth, inter latency).
        """
        for name, value in [("hosts", hosts), ("devices_per_host", devices_per_host)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        graph = nx.Graph()
        attrs = {k: v for k, v in [("flops", device_flops), ("memory_bytes", device_memory_bytes)]
                 if v is not None}
        for host in range(hosts):
            for index in range(devices_per_host):
                graph.add_node((host, index), kind="device", host=host, index=index, **attrs)
        for host in range(hosts):
            graph.add_node(("switch", host), kind="switch", host=host)
            for index in range(devices_per_host):
                graph.add_edge((host, index), ("switch", host), bandwidth=intra_gbytes_per_s * 1e9,
                               latency=intra_latency_us * 1e-6 / 2)
                if hosts > 1:
                    graph.add_edge((host, index), "fabric", bandwidth=inter_gbytes_per_s * 1e9,
                                   latency=inter_latency_us * 1e-6 / 2)
        if hosts > 1:
            graph.nodes["fabric"]["kind"] = "switch"
        return cls(graph)

    @classmethod
    def dgx_a100(cls, hosts: int = 1) -> Cluster:
        """DGX A100 nodes: 8 GPUs on NVSwitch (300 GB/s per direction), one 200 Gb/s HDR
        InfiniBand NIC per GPU (25 GB/s); 312 TFLOP/s bf16 and 80 GiB each."""
        return cls.homogeneous(hosts, 8, intra_gbytes_per_s=300.0, inter_gbytes_per_s=25.0,
                               intra_latency_us=2.0, inter_latency_us=5.0, device_flops=312e12,
                               device_memory_bytes=80 * 2 ** 30)

    @classmethod
    def cpu_host(cls, devices: int | None = None) -> Cluster:
        """One host whose processes talk through gloo over loopback (~5 GB/s, ~20 us);
        ``devices`` defaults to this machine's CPU count."""
        count = devices if devices is not None else (os.cpu_count() or 1)
        return cls.homogeneous(1, count, intra_gbytes_per_s=5.0, inter_gbytes_per_s=5.0,
                               intra_latency_us=20.0, inter_latency_us=20.0)

    # --- queries ---------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> list[Hashable]:
        """Host names in order of first appearance."""
        return list(dict.fromkeys(self.host_of(d) for d in self.devices))

    def host_of(self, device: Device) -> Hashable:
        return self.graph.nodes[self._checked(device)]["host"]

    def device_index(self, device: Device) -> int:
        """Position of ``device`` in the host-major device order."""
        return self._index[self._checked(device)]

    def link(self, a: Device, b: Device) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) between two devices along the widest path (the
        largest bottleneck bandwidth), the least total latency among the widest; (inf, 0) for a == b."""
        i, j = self.device_index(a), self.device_index(b)
        bandwidth, latency = self.link_matrices()
        return float(bandwidth[i, j]), float(latency[i, j])

    def link_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(bandwidth, latency), each (num_devices, num_devices) in device order; read-only."""
        return self._links

    def _checked(self, device: Device) -> Device:
        if device not in self._index:
            raise ValueError(f"{device!r} is not a device of this cluster; devices are nodes "
                             f"with kind='device', e.g. {list(self.devices[:3])}")
        return device

    @cached_property
    def _links(self) -> tuple[np.ndarray, np.ndarray]:
        # Bottleneck(s, t) is the largest level b such that t is reachable from s over edges
        # with bandwidth >= b; the latency is the shortest path within that subgraph.
        n = self.num_devices
        bandwidth, latency = np.full((n, n), np.inf), np.zeros((n, n))
        levels = sorted({bw for _, _, bw in self.graph.edges(data="bandwidth")}, reverse=True)
        subgraphs = [nx.Graph([(u, v, d) for u, v, d in self.graph.edges(data=True)
                               if d["bandwidth"] >= level]) for level in levels]
        for i, source in enumerate(self.devices):
            remaining = set(range(n)) - {i}
            for level, sub in zip(levels, subgraphs):
                if not remaining:
                    break
                if source not in sub:
                    continue
                dist = nx.single_source_dijkstra_path_length(sub, source, weight="latency")
                for j in [j for j in remaining if self.devices[j] in dist]:
                    bandwidth[i, j], latency[i, j] = level, dist[self.devices[j]]
                    remaining.discard(j)
        bandwidth.flags.writeable = latency.flags.writeable = False
        return bandwidth, latency

    def __repr__(self) -> str:
        return f"Cluster(hosts={len(self.hosts)}, devices={self.num_devices})"


def _check_links(graph: nx.Graph) -> None:
    for u, v, data in graph.edges(data=True):
        bandwidth = data.get("bandwidth")
        if not isinstance(bandwidth, Real) or not math.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"every link needs a finite bandwidth > 0 (bytes/s); link {u!r} -- {v!r} "
                             f"has bandwidth={bandwidth!r}; set graph.edges[u, v]['bandwidth']")
        latency = data.setdefault("latency", 0.0)
        if not isinstance(latency, Real) or not math.isfinite(latency) or latency < 0:
            raise ValueError(f"link latency must be a finite number >= 0 (seconds); link {u!r} -- "
                             f"{v!r} has latency={latency!r}")


def _device_order(graph: nx.Graph) -> tuple[Device, ...]:
    devices = [n for n, kind in graph.nodes(data="kind") if kind == "device"]
    if not devices:
        raise ValueError("a cluster needs device nodes, got none; mark each device with "
                         "graph.add_node(name, kind='device', host=HOST)")
    hosts: dict[Hashable, int] = {}
    for position, device in enumerate(devices):
        data = graph.nodes[device]
        if "host" not in data:
            raise ValueError(f"device {device!r} has no 'host' attribute; add host=HOST to every device")
        hosts.setdefault(data["host"], len(hosts))
        index = data.setdefault("index", position)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"device {device!r} has index={index!r}; an index must be an integer")
    positions = {d: p for p, d in enumerate(devices)}
    key = lambda d: (hosts[graph.nodes[d]["host"]], graph.nodes[d]["index"], positions[d])  # noqa: E731
    return tuple(sorted(devices, key=key))


def _check_reachable(graph: nx.Graph, devices: Sequence[Device]) -> None:
    reached = nx.node_connected_component(graph, devices[0])
    unreachable = [d for d in devices if d not in reached]
    if unreachable:
        raise ValueError(f"every device must reach every other; {unreachable[:3]} cannot reach "
                         f"{devices[0]!r}; add links joining them")


# --- the cost model -----------------------------------------------------------
def _checked_weights(topology: ProcessTopology, weights: Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return {axis: float(DEFAULT_WEIGHTS.get(axis, 0.0)) for axis in topology.axes}
    unknown = sorted(set(weights) - set(topology.axes))
    if unknown:
        raise ValueError(f"weights name unknown axes {unknown}; this topology's axes are "
                         f"{topology.axes}; drop them or rename them")
    for axis, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, Real) \
                or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of axis {axis!r} must be a finite number >= 0, got {weight!r}; "
                             "use 0 to ignore an axis")
    return {axis: float(weights.get(axis, 0.0)) for axis in topology.axes}


def _traffic_matrix(topology: ProcessTopology, weights: Mapping[str, float]) -> np.ndarray:
    """Symmetric (world, world): summed weight of the hops between two ranks."""
    traffic = np.zeros((topology.world_size, topology.world_size))
    for axis, weight in weights.items():
        if weight == 0:
            continue
        for group in topology.axis_groups(axis):
            if len(group) < 2:
                continue
            hops = zip(group, group[1:] if axis in _CHAIN_AXES else group[1:] + group[:1])
            for a, b in hops:
                traffic[a, b] += weight
                traffic[b, a] += weight
    return traffic


def _hop_times(cluster: Cluster, message_bytes: float) -> np.ndarray:
    if not isinstance(message_bytes, Real) or not message_bytes > 0 or math.isinf(message_bytes):
        raise ValueError(f"message_bytes must be a finite number > 0, got {message_bytes!r}")
    bandwidth, latency = cluster.link_matrices()
    return latency + message_bytes / bandwidth  # diagonal: 0 + bytes / inf = 0


def _device_indices(topology: ProcessTopology, cluster: Cluster, mapping: DeviceMapping) -> np.ndarray:
    world = topology.world_size
    if isinstance(mapping, Mapping):
        if set(mapping) != set(range(world)):
            raise ValueError(f"a mapping dict needs exactly the ranks 0..{world - 1} as keys, got "
                             f"{len(mapping)} keys; map every rank of {topology!r} once")
        mapping = [mapping[r] for r in range(world)]
    mapping = list(mapping)
    if len(mapping) != world:
        raise ValueError(f"mapping must give one device per rank: {topology!r} has {world} ranks, "
                         f"got {len(mapping)} devices")
    indices = np.array([cluster.device_index(d) for d in mapping], dtype=np.int64)
    counts = np.bincount(indices, minlength=cluster.num_devices)
    if counts.max() > 1:
        dup = cluster.devices[int(np.argmax(counts))]
        raise ValueError(f"mapping must give each rank its own device; {dup!r} is given to "
                         f"{int(counts.max())} ranks; map every rank to a different device")
    return indices


def _check_fits(topology: ProcessTopology, cluster: Cluster) -> None:
    if topology.world_size > cluster.num_devices:
        raise ValueError(f"{topology!r} needs {topology.world_size} devices, the cluster has "
                         f"{cluster.num_devices}; shrink the topology or add hosts")


def communication_cost(topology: ProcessTopology, cluster: Cluster, mapping: DeviceMapping,
                       weights: Mapping[str, float] | None = None,
                       message_bytes: float = DEFAULT_MESSAGE_BYTES) -> float:
    """Weighted time of one reference message over every communication hop of the grid.

    Model: every group of ``topology.axis_groups(axis)`` is a ring (member k sends to member
    k+1 and the last back to the first; a 2-member ring crosses its link twice), except the
    ``pipe`` axis, a chain of consecutive pipe ranks. A hop between ranks on devices a, b costs
    ``latency(a, b) + message_bytes / bandwidth(a, b)`` from ``cluster.link``, and
    ``cost = sum over axes of weights[axis] * sum of its hop costs``. Weights are relative
    traffic volumes: tensor (per-layer collectives) 100, data (per-step gradients) 10,
    pipe (point-to-point activations) 1 by default; an axis missing from ``weights`` costs 0.
    Lower is better; only comparisons on one topology, cluster and weights are meaningful.
    """
    weights = _checked_weights(topology, weights)
    _check_fits(topology, cluster)
    indices = _device_indices(topology, cluster, mapping)
    hop = _hop_times(cluster, message_bytes)[np.ix_(indices, indices)]
    return float(np.sum(np.triu(_traffic_matrix(topology, weights) * hop, 1)))


def default_mapping(topology: ProcessTopology, cluster: Cluster) -> list[Device]:
    """Rank i on the i-th device in host-major order: the rank order as is."""
    _check_fits(topology, cluster)
    return list(cluster.devices[:topology.world_size])


# --- the search ----------------------------------------------------------------
def place(topology: ProcessTopology, cluster: Cluster, weights: Mapping[str, float] | None = None,
          message_bytes: float = DEFAULT_MESSAGE_BYTES, max_passes: int = 50) -> list[Device]:
    """A rank -> device list that costs no more than ``default_mapping`` (deterministic).

    Candidates: the default order and, for each level of the axes sorted by weight (heaviest
    first), a first-fit packing of that level's groups into hosts. Each is improved by
    pairwise swaps (also with unused devices) that strictly lower ``communication_cost``;
    the cheapest wins, the default on ties.
    """
    weights = _checked_weights(topology, weights)
    _check_fits(topology, cluster)
    hop = _hop_times(cluster, message_bytes)
    traffic = _traffic_matrix(topology, weights)
    default = list(range(cluster.num_devices))
    candidates = [default] + [_first_fit(order, block, cluster)
                              for order, block in _packing_levels(topology, weights)]
    best, best_cost = default, _total(traffic, hop, default)
    for slots in candidates:
        slots = _swap_search(traffic, hop, slots, max_passes)
        cost = _total(traffic, hop, slots)
        if cost < best_cost:
            best, best_cost = slots, cost
    return [cluster.devices[i] for i in best[:topology.world_size]]


def _total(traffic: np.ndarray, hop: np.ndarray, slots: Sequence[int]) -> float:
    ranks = np.asarray(slots[:traffic.shape[0]])
    return float(np.sum(np.triu(traffic * hop[np.ix_(ranks, ranks)], 1)))


def _packing_levels(topology: ProcessTopology, weights: Mapping[str, float]) -> list[tuple[list[int], int]]:
    """(rank order with the heaviest axis fastest, block size) for each level of that order."""
    # ties: the faster axis of the topology counts as heavier (it is already close together)
    axes = sorted(range(len(topology.axes)), key=lambda k: (-weights[topology.axes[k]], -k))
    if all(weights[topology.axes[k]] == 0 for k in axes):
        return []
    slow_to_fast = axes[::-1]
    shape = [topology.dims[k] for k in slow_to_fast]
    strides = [math.prod(topology.dims[k + 1:]) for k in slow_to_fast]
    order = [sum(c * s for c, s in zip(coord, strides)) for coord in np.ndindex(*shape)]
    blocks = [math.prod(topology.dims[k] for k in axes[:n + 1]) for n in range(len(axes))]
    return [(order, block) for block in dict.fromkeys(blocks)]


def _first_fit(order: list[int], block: int, cluster: Cluster) -> list[int]:
    """Slots (rank r -> device index slots[r]; unused devices after): each block of ``order``
    goes to the first host with room for all of it, else onto the free devices host-major."""
    free: dict[Hashable, list[int]] = {}
    for i, device in enumerate(cluster.devices):
        free.setdefault(cluster.host_of(device), []).append(i)
    slots = [-1] * len(order)
    for start in range(0, len(order), block):
        ranks = order[start:start + block]
        host = next((h for h, devs in free.items() if len(devs) >= len(ranks)), None)
        chosen = free[host][:len(ranks)] if host is not None else \
            [i for devs in free.values() for i in devs][:len(ranks)]
        for rank, index in zip(ranks, chosen):
            slots[rank] = index
            free[cluster.host_of(cluster.devices[index])].remove(index)
    return slots + sorted(set(range(cluster.num_devices)) - set(slots))


def _swap_search(traffic: np.ndarray, hop: np.ndarray, slots: list[int], max_passes: int) -> list[int]:
    """Best-improvement swaps per rank, kept only when they lower the cost, until none does."""
    world, n = traffic.shape[0], len(slots)
    weight = np.zeros((n, n))
    weight[:world, :world] = traffic
    slots = list(slots)
    dist = hop[np.ix_(slots, slots)]
    tolerance = 1e-12 * max(float(np.sum(weight * dist)), 1e-300)
    for _ in range(max_passes):
        improved = False
        for r in range(world):
            delta = _swap_deltas(weight, dist, r)
            delta[r] = np.inf
            s = int(np.argmin(delta))
            if delta[s] < -tolerance:
                slots[r], slots[s] = slots[s], slots[r]
                dist[[r, s]] = dist[[s, r]]
                dist[:, [r, s]] = dist[:, [s, r]]
                improved = True
        if not improved:
            break
    return slots


def _swap_deltas(weight: np.ndarray, dist: np.ndarray, r: int) -> np.ndarray:
    """Cost change of exchanging the devices of slot r and each slot s, for all s at once.

    delta[s] = sum_{u != r, s} (W[r,u] - W[s,u]) (D[s,u] - D[r,u]); the full sum over u
    has two extra terms, -2 W[r,s] D[r,s], added back here.
    """
    own = float(weight[r] @ dist[r])
    rowdot = np.einsum("ij,ij->i", weight, dist)
    return dist @ weight[r] - own - rowdot + weight @ dist[r] + 2 * weight[r] * dist[r]
