"""Placement: cluster graphs, link bandwidth/latency, the cost model and the mapping search."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest

from pipegrid.topology.grid import ProcessTopology, Topology
from pipegrid.topology.cluster import Cluster, communication_cost, default_mapping, place

SHAPES = [(2, 2, 2), (4, 2, 8), (2, 4, 4), (8, 1, 8)]
CLUSTERS = [(2, 4), (2, 8), (4, 4), (4, 6), (8, 4), (8, 6), (8, 8)]
CASES = [(shape, hosts, per_host) for shape, (hosts, per_host) in itertools.product(SHAPES, CLUSTERS)
         if shape[0] * shape[1] * shape[2] <= hosts * per_host]


def _cluster(hosts: int, per_host: int) -> Cluster:
    return Cluster.homogeneous(hosts, per_host, intra_gbytes_per_s=300.0, inter_gbytes_per_s=25.0,
                               intra_latency_us=2.0, inter_latency_us=5.0)


def _interleaved(topology: ProcessTopology, hosts: int) -> list[tuple[int, int]]:
    """The naive order: rank i on host i % hosts."""
    return [(rank % hosts, rank // hosts) for rank in range(topology.world_size)]


def _hosts_of_groups(topology, cluster, mapping, axis):
    return [{cluster.host_of(mapping[r]) for r in group} for group in topology.axis_groups(axis)]


# --- the cluster graph ------------------------------------------------------------
def test_homogeneous_links_within_and_across_hosts():
    cluster = _cluster(2, 4)
    assert cluster.num_devices == 8 and cluster.hosts == [0, 1]
    assert cluster.devices[:5] == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0))
    bandwidth, latency = cluster.link((0, 0), (0, 3))
    assert bandwidth == pytest.approx(300e9) and latency == pytest.approx(2e-6)
    bandwidth, latency = cluster.link((0, 1), (1, 2))
    assert bandwidth == pytest.approx(25e9) and latency == pytest.approx(5e-6)
    assert cluster.link((1, 2), (0, 1)) == cluster.link((0, 1), (1, 2))
    assert cluster.link((1, 1), (1, 1)) == (float("inf"), 0.0)


def test_presets():
    dgx = Cluster.dgx_a100(hosts=2)
    assert dgx.num_devices == 16 and dgx.graph.nodes[(1, 7)]["flops"] == pytest.approx(312e12)
    assert dgx.link((0, 0), (0, 7))[0] > dgx.link((0, 0), (1, 0))[0]
    cpu = Cluster.cpu_host(3)
    assert cpu.num_devices == 3 and cpu.hosts == [0]
    assert Cluster.cpu_host().num_devices >= 1


def test_user_graph_widest_path_and_summed_latency():
    graph = nx.Graph()
    for name, host in [("a", "h0"), ("b", "h0"), ("c", "h1")]:
        graph.add_node(name, kind="device", host=host)
    graph.add_node("sw", kind="switch")
    graph.add_edge("a", "b", bandwidth=10.0, latency=1.0)        # direct but narrow
    graph.add_edge("a", "sw", bandwidth=100.0, latency=2.0)      # wide detour
    graph.add_edge("sw", "b", bandwidth=100.0, latency=3.0)
    graph.add_edge("b", "c", bandwidth=50.0)                     # latency defaults to 0
    cluster = Cluster(graph)
    assert cluster.devices == ("a", "b", "c")
    assert cluster.link("a", "b") == (100.0, 5.0)
    assert cluster.link("a", "c") == (50.0, 5.0)
    graph.add_edge("a", "c", bandwidth=1e6)                      # the cluster holds a frozen copy
    assert cluster.link("a", "c") == (50.0, 5.0)


def test_device_order_is_host_major_by_index():
    graph = nx.Graph()
    for host, index in [(1, 1), (0, 1), (1, 0), (0, 0)]:
        graph.add_node(f"d{host}{index}", kind="device", host=host, index=index)
    for u, v in itertools.combinations(list(graph), 2):
        graph.add_edge(u, v, bandwidth=1.0)
    assert Cluster(graph).devices == ("d10", "d11", "d00", "d01")


@pytest.mark.parametrize("breaks, match", [
    (lambda g: g.add_edge((0, 0), (0, 1)), "bandwidth"),
    (lambda g: g.add_edge((0, 0), (0, 1), bandwidth=-1.0), "bandwidth"),
    (lambda g: g.add_edge((0, 0), (0, 1), bandwidth=1.0, latency=-1.0), "latency"),
    (lambda g: g.add_node((5, 0), kind="device", host=5), "reach"),
    (lambda g: g.add_node((5, 0), kind="device"), "host"),
])
def test_bad_cluster_graph(breaks, match):
    graph = _cluster(2, 2).graph.copy()
    breaks(graph)
    with pytest.raises(ValueError, match=match):
        Cluster(graph)


def test_graph_without_devices_or_of_wrong_type():
    with pytest.raises(ValueError, match="kind='device'"):
        Cluster(nx.path_graph(3))
    with pytest.raises(TypeError, match="nx.Graph"):
        Cluster(nx.DiGraph())


# --- the cost model ---------------------------------------------------------------
@pytest.mark.parametrize("shape, hosts, per_host", CASES)
def test_default_order_never_costs_more_than_interleaved(shape, hosts, per_host):
    topology, cluster = Topology(*shape), _cluster(hosts, per_host)
    default = communication_cost(topology, cluster, default_mapping(topology, cluster))
    assert default <= communication_cost(topology, cluster, _interleaved(topology, hosts))


def test_splitting_a_tensor_group_costs_more():
    topology, cluster = Topology(pipe=1, data=2, tensor=4), _cluster(2, 4)
    kept = default_mapping(topology, cluster)
    split = list(kept)
    split[3], split[4] = split[4], split[3]
    assert _hosts_of_groups(topology, cluster, kept, "tensor") == [{0}, {1}]
    assert communication_cost(topology, cluster, split) > communication_cost(topology, cluster, kept)


def test_cost_follows_the_weights_and_accepts_dict_mappings():
    topology, cluster = Topology(pipe=2, data=2, tensor=2), _cluster(2, 4)
    mapping = default_mapping(topology, cluster)
    as_dict = {rank: device for rank, device in enumerate(mapping)}
    assert communication_cost(topology, cluster, as_dict) == communication_cost(topology, cluster, mapping)
    only_pipe = communication_cost(topology, cluster, mapping, weights={"pipe": 1.0})
    # pipe chains: 4 chains of 2 stages, each crossing hosts once (stage 0 on host 0, stage 1 on host 1)
    assert only_pipe == pytest.approx(4 * (5e-6 + 2 ** 20 / 25e9))
    assert communication_cost(topology, cluster, mapping, weights={"pipe": 0.0}) == 0.0


# --- the search -------------------------------------------------------------------
@pytest.mark.parametrize("shape, hosts, per_host", CASES)
def test_place_never_costs_more_than_default(shape, hosts, per_host):
    topology, cluster = Topology(*shape), _cluster(hosts, per_host)
    placed = place(topology, cluster)
    assert len(placed) == topology.world_size and len(set(placed)) == topology.world_size
    assert communication_cost(topology, cluster, placed) <= \
        communication_cost(topology, cluster, default_mapping(topology, cluster))


def test_place_keeps_tensor_groups_whole_when_hosts_do_not_divide_evenly():
    # hosts of 6 and tensor groups of 4: the default order splits the second group across hosts
    topology, cluster = Topology(pipe=1, data=2, tensor=4), _cluster(2, 6)
    default, placed = default_mapping(topology, cluster), place(topology, cluster)
    assert {0, 1} in _hosts_of_groups(topology, cluster, default, "tensor")
    assert all(len(hosts) == 1 for hosts in _hosts_of_groups(topology, cluster, placed, "tensor"))
    assert communication_cost(topology, cluster, placed) < communication_cost(topology, cluster, default)


def test_place_fixes_a_topology_with_tensor_as_the_slowest_axis():
    topology = ProcessTopology(["tensor", "pipe", "data"], [4, 2, 2])
    cluster = _cluster(2, 8)
    default, placed = default_mapping(topology, cluster), place(topology, cluster)
    assert all(len(hosts) == 2 for hosts in _hosts_of_groups(topology, cluster, default, "tensor"))
    assert all(len(hosts) == 1 for hosts in _hosts_of_groups(topology, cluster, placed, "tensor"))
    assert communication_cost(topology, cluster, placed) < communication_cost(topology, cluster, default)


def test_place_follows_custom_weights():
    topology, cluster = Topology(pipe=4, data=1, tensor=2), _cluster(2, 4)
    weights = {"pipe": 100.0, "data": 0.0, "tensor": 1.0}
    placed = place(topology, cluster, weights)
    assert all(len(hosts) == 1 for hosts in _hosts_of_groups(topology, cluster, placed, "pipe"))
    assert communication_cost(topology, cluster, placed, weights) < \
        communication_cost(topology, cluster, default_mapping(topology, cluster), weights)


def test_place_uses_the_larger_host_of_an_uneven_cluster():
    graph = nx.Graph()
    for host, count in [("small", 2), ("big", 4)]:
        graph.add_node(("switch", host), kind="switch")
        for index in range(count):
            graph.add_node((host, index), kind="device", host=host, index=index)
            graph.add_edge((host, index), ("switch", host), bandwidth=300e9, latency=1e-6)
    graph.add_edge(("switch", "small"), ("switch", "big"), bandwidth=25e9, latency=3e-6)
    topology, cluster = Topology(pipe=1, data=1, tensor=4), Cluster(graph)
    placed = place(topology, cluster)
    assert placed == [("big", 0), ("big", 1), ("big", 2), ("big", 3)]
    assert communication_cost(topology, cluster, placed) < \
        communication_cost(topology, cluster, default_mapping(topology, cluster))


def test_place_is_deterministic_and_single_host_is_the_default():
    topology, cluster = Topology(pipe=2, data=2, tensor=4), _cluster(4, 6)
    assert place(topology, cluster) == place(topology, cluster)
    small = Topology(pipe=2, data=1, tensor=2)
    assert place(small, Cluster.cpu_host(4)) == default_mapping(small, Cluster.cpu_host(4))


# --- bad input --------------------------------------------------------------------
def test_bad_input_errors_say_what_to_fix():
    topology, cluster = Topology(pipe=2, data=2, tensor=2), _cluster(2, 4)
    mapping = default_mapping(topology, cluster)
    with pytest.raises(ValueError, match="needs 16 devices.*has 8"):
        place(Topology(pipe=2, data=2, tensor=4), cluster)
    with pytest.raises(ValueError, match="needs 16 devices"):
        default_mapping(Topology(pipe=2, data=2, tensor=4), cluster)
    with pytest.raises(ValueError, match=r"unknown axes \['expert'\]"):
        communication_cost(topology, cluster, mapping, weights={"expert": 1.0})
    with pytest.raises(ValueError, match="unknown axes"):
        place(topology, cluster, weights={"tensr": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        place(topology, cluster, weights={"tensor": -1.0})
    with pytest.raises(ValueError, match="used|given to 2 ranks"):
        communication_cost(topology, cluster, [mapping[0]] + mapping[:-1])
    with pytest.raises(ValueError, match="8 ranks, got 7"):
        communication_cost(topology, cluster, mapping[:-1])
    with pytest.raises(ValueError, match="keys"):
        communication_cost(topology, cluster, {r + 1: d for r, d in enumerate(mapping)})
    with pytest.raises(ValueError, match="not a device"):
        communication_cost(topology, cluster, mapping[:-1] + [("switch", 0)])
    with pytest.raises(ValueError, match="message_bytes"):
        communication_cost(topology, cluster, mapping, message_bytes=0)
