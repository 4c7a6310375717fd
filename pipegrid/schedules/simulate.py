"""``simulate``: a networkx dependency graph of all ranks' streams, timed with op costs.

Gives makespan, per-rank busy/idle, bubble fraction, peak activations in flight per
stage, and every op's start/end (what ``render`` draws). A cycle is a ScheduleError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import networkx as nx

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, Forward, Instruction, is_compute, is_recv,
    is_send, parts,
)
from pipegrid.schedules.schedule import Schedule

__all__ = ["simulate", "SimResult", "DEFAULT_COSTS", "Event"]

DEFAULT_COSTS: Mapping[str, float] = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.0}
Event = tuple[int, str, float, float]
"""A timed op for rendering: (rank, label, start, end)."""
_Node = tuple[int, int]  # (rank, position in its stream)


@dataclass(frozen=True, eq=False)
class SimResult:
    """Timing of one step of a schedule under given op costs."""

    schedule: Schedule
    """The schedule that was simulated."""
    costs: Mapping[str, float]
    """The costs used: F, B (input-grad part for split schedules), W, comm latency."""
    makespan: float
    """Time from the first op to the last, over all ranks."""
    busy: tuple[float, ...]
    """busy[rank]: time spent in compute (F, B, I, W)."""
    idle: tuple[float, ...]
    """idle[rank]: makespan - busy[rank]."""
    bubble_fraction: float
    """idle / makespan, averaged over ranks."""
    peak_inflight: tuple[int, ...]
    """peak_inflight[stage]: most micro-batches whose activations model stage holds at once."""
    start: Mapping[_Node, float] = field(repr=False)
    """start[(rank, position)] of every instruction."""
    end: Mapping[_Node, float] = field(repr=False)
    """end[(rank, position)] of every instruction."""

    def events(self, compute_only: bool = True) -> list[Event]:
        """(rank, label, start, end) per op in stream order, e.g. for ``render``."""
        out: list[Event] = []
        for rank, stream in enumerate(self.schedule.streams):
            for position, op in enumerate(stream):
                if compute_only and not is_compute(op):
                    continue
                node = (rank, position)
                out.append((rank, str(op), self.start[node], self.end[node]))
        return out


def _cost(op: Instruction, costs: Mapping[str, float]) -> float:
    if isinstance(op, Forward):
        return costs["F"]
    if isinstance(op, Backward):
        return costs["B"] + costs["W"]
    if isinstance(op, BackwardInput):
        return costs["B"]
    if isinstance(op, BackwardWeight):
        return costs["W"]
    return 0 * costs["F"]  # zero of the same number type (Fraction stays exact)




def build_graph(schedule: Schedule, comm: float = 0.0) -> nx.DiGraph:
    """Dependency DAG: nodes (rank, position), edge attribute ``latency``.

    A received message's edge ends at the op that reads it, not at its receive: a
    receive is posted where it stands and only its reader waits for the data.
    """
    graph = nx.DiGraph()
    compute: dict[tuple[str, int, int], _Node] = {}
    sends: dict[tuple[str, int, int], _Node] = {}
    for rank, stream in enumerate(schedule.streams):
        for position, op in enumerate(stream):
            graph.add_node((rank, position))
            if position:
                graph.add_edge((rank, position - 1), (rank, position), latency=0)
            if is_compute(op):
                key = (op.code, op.stage, op.micro_batch)  # type: ignore[union-attr]
                compute[key] = (rank, position)
            for part in parts(op):
                if is_send(part) and schedule.transfers(part):
                    sends[schedule.message_key(part)] = (rank, position)
    for rank, stream in enumerate(schedule.streams):
        for position, op in enumerate(stream):
            for part in filter(is_recv, parts(op)):
                if schedule.message_key(part) not in sends:
                    raise ScheduleError(
                        f"rank {rank}, position {position} ({part}): no matching send; "
                        f"run validate(schedule) for details\n{schedule.table()}")
            message = schedule.reads(op)
            if message is not None and message in sends:
                graph.add_edge(sends[message], (rank, position), latency=comm)
    _add_data_edges(graph, compute, schedule.split_backward)
    return graph


def _add_data_edges(graph: nx.DiGraph, compute: dict[tuple[str, int, int], _Node],
                    split: bool) -> None:
    """F(s,mb)->F(s+1,mb) and B(s+1,mb)->B(s,mb) (I for split); direct, zero latency."""
    back = "I" if split else "B"
    for (code, stage, mb), node in compute.items():
        after = None
        if code == "F":
            after = compute.get(("F", stage + 1, mb))
        elif code == back:
            after = compute.get((back, stage - 1, mb))
        if after is not None and not graph.has_edge(node, after):
            graph.add_edge(node, after, latency=0)


def simulate(schedule: Schedule, costs: Mapping[str, float] | None = None) -> SimResult:
    """Time every op; ``costs`` keys: F, B, W, comm (missing keys take DEFAULT_COSTS)."""
    merged = dict(DEFAULT_COSTS)
    unknown = set(costs or {}) - set(DEFAULT_COSTS)
    if unknown:
        raise ValueError(f"unknown cost keys {sorted(unknown)}; use F, B, W and comm")
    merged.update(costs or {})
    graph = build_graph(schedule, merged["comm"])
    try:
        order = list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        raise _cycle_error(schedule, graph) from None
    start: dict[_Node, float] = {}
    end: dict[_Node, float] = {}
    zero = 0 * merged["F"]
    for node in order:
        begin = zero
        for pred in graph.predecessors(node):
            begin = max(begin, end[pred] + graph.edges[pred, node]["latency"])
        start[node] = begin
        end[node] = begin + _cost(schedule.streams[node[0]][node[1]], merged)
    return _summarise(schedule, merged, start, end)


def _summarise(schedule: Schedule, costs: Mapping[str, float],
               start: dict[_Node, float], end: dict[_Node, float]) -> SimResult:
    zero = 0 * costs["F"]
    makespan = max(end.values(), default=zero)
    busy = tuple(sum((end[(r, i)] - start[(r, i)] for i, op in enumerate(stream)
                      if is_compute(op)), zero)
                 for r, stream in enumerate(schedule.streams))
    idle = tuple(makespan - b for b in busy)
    bubble = sum(i / makespan for i in idle) / len(idle) if makespan else zero
    return SimResult(schedule=schedule, costs=costs, makespan=makespan, busy=busy, idle=idle,
                     bubble_fraction=bubble, peak_inflight=_peak_inflight(schedule),
                     start=start, end=end)


def _peak_inflight(schedule: Schedule) -> tuple[int, ...]:
    """Per model stage: activations held from a forward to the end of its (input) backward."""
    peak = [0] * schedule.num_model_stages
    held = [0] * schedule.num_model_stages
    for stream in schedule.streams:
        for op in stream:
            if isinstance(op, Forward):
                held[op.stage] += 1
                peak[op.stage] = max(peak[op.stage], held[op.stage])
                if not schedule.training:
                    held[op.stage] -= 1  # forward-only: freed once sent on
            elif isinstance(op, (Backward, BackwardInput)):
                held[op.stage] -= 1
    return tuple(peak)


def _cycle_error(schedule: Schedule, graph: nx.DiGraph) -> ScheduleError:
    cycle = nx.find_cycle(graph)
    steps = " -> ".join(f"rank {u[0]} pos {u[1]} ({schedule.streams[u[0]][u[1]]})"
                        for u, _ in cycle)
    return ScheduleError(
        f"{schedule.name}: dependency cycle (would deadlock): {steps}; reorder the "
        f"streams so each op comes after what it depends on\n{schedule.table()}")
