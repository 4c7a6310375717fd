"""``simulate``: a networkx dependency graph of all ranks' streams, timed with op costs.

Gives makespan, per-rank busy/idle, bubble fraction, peak activations in flight per
stage, and every op's start/end (what ``render`` draws). A cycle is a ScheduleError.
Costs are one per op kind, or per model stage (``stage_costs``: the first stage has no
input gradient, the last computes the loss); ``post`` charges a rank for posting a transfer;
``wake`` delays a message whose receive was posted only after its send; ``BW``, when given,
is a whole backward's cost where B and W are a split backward's halves (a schedule that splits
some backwards and not others, as DualPipeV: whole costs less than I then W on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence

import networkx as nx

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, Forward, Instruction, is_compute, is_recv,
    is_send, parts,
)
from pipegrid.schedules.loss_message import knows_loss_after
from pipegrid.schedules.schedule import Schedule

__all__ = ["simulate", "SimResult", "DEFAULT_COSTS", "Event"]

DEFAULT_COSTS: Mapping[str, float] = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.0, "post": 0.0, "wake": 0.0}
"""F, B (a split backward's input half), W: compute seconds; comm: a message's latency from
its send to its reader; post: the rank's own time to post one transfer instruction (on CPU gloo
the send's copy and the peer's wake-up cost host time; on GPUs a copy engine moves it: 0);
wake: a message whose receive is posted after its send arrives ``wake`` after that receive, not
``comm`` after the send (gloo holds the send until the receiver asks, and the sender's progress
thread, on a core its rank keeps busy, must wake to answer; 0 on GPUs). Optional, not here:
BW, a whole backward where B and W are the split halves (default B + W)."""
_OPTIONAL = frozenset({"BW"})
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
    peak_held: tuple[int, ...]
    """peak_held[rank]: most (micro-batch, chunk) activations the rank holds at once, over
    all its chunks together, from a forward to its (input) backward."""
    loss_known: tuple[float, ...]
    """loss_known[rank]: when the rank has the step's loss: the loss rank after its last
    loss, others where they read the gradient message marked to carry it (or, without
    marks, at the end of the step, from the all-reduce)."""
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


def _cost(op: Instruction, costs: Mapping[str, float],
          stage_costs: Sequence[Mapping[str, float]] | None = None, schedule: Schedule | None = None) -> float:
    zero = 0 * costs["F"]  # zero of the same number type (Fraction stays exact)
    if not is_compute(op):
        post = costs.get("post", zero)
        return post if post and _posts(op, schedule) else zero
    if stage_costs is not None:  # (a stage without BW splits its whole backward into its own B + W)
        costs = {**{k: c for k, c in costs.items() if k != "BW"}, **stage_costs[op.stage]}  # type: ignore[union-attr]
    if isinstance(op, Forward):
        return costs["F"]
    if isinstance(op, Backward):
        return costs["BW"] if "BW" in costs else costs["B"] + costs["W"]
    if isinstance(op, BackwardInput):
        return costs["B"]
    if isinstance(op, BackwardWeight):
        return costs["W"]
    return zero


def _posts(op: Instruction, schedule: Schedule | None) -> bool:
    """Whether ``op`` puts a message on the wire (a coalesced group's place-markers do not)."""
    return any((is_send(part) or is_recv(part)) and (schedule is None or schedule.transfers(part))
               for part in parts(op))


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
    _add_data_edges(graph, compute)
    last = schedule.num_model_stages - 1
    for (code, stage, item), node in compute.items():  # generation: a sampled token feeds stage 0
        source = schedule.fed_by(item) if (code, stage) == ("F", 0) else None
        if source is not None and ("F", last, source) in compute:
            graph.add_edge(compute[("F", last, source)], node, latency=0)
    return graph


def _add_data_edges(graph: nx.DiGraph, compute: dict[tuple[str, int, int], _Node]) -> None:
    """F(s,mb)->F(s+1,mb) and input-gradient (B or I) (s+1,mb) -> (s,mb); direct, zero latency."""
    gradient = {(stage, mb): node for (code, stage, mb), node in compute.items() if code in ("B", "I")}
    for (code, stage, mb), node in compute.items():
        after = None
        if code == "F":
            after = compute.get(("F", stage + 1, mb))
        elif code in ("B", "I"):
            after = gradient.get((stage - 1, mb))
        if after is not None and not graph.has_edge(node, after):
            graph.add_edge(node, after, latency=0)


def simulate(schedule: Schedule, costs: Mapping[str, float] | None = None,
             stage_costs: Sequence[Mapping[str, float]] | None = None) -> SimResult:
    """Time every op; ``costs`` keys: F, B, W, comm, post, wake (missing keys take DEFAULT_COSTS)
    and optionally BW. ``stage_costs[s]``, when given, overrides F, B, W (and BW) for model stage s's ops."""
    merged = dict(DEFAULT_COSTS)
    unknown = set(costs or {}) - set(DEFAULT_COSTS) - _OPTIONAL
    if unknown:
        raise ValueError(f"unknown cost keys {sorted(unknown)}; use F, B, W, BW, comm, post and wake")
    merged.update(costs or {})
    if stage_costs is not None:
        stage_costs = _checked_stage_costs(schedule, stage_costs)
    played = play(schedule, merged, stage_costs)
    if played is None:  # stuck: the graph names the cycle (or the receive without a send)
        graph = build_graph(schedule, merged["comm"])
        raise _cycle_error(schedule, graph)
    return _summarise(schedule, merged, *played)  # (busy counts compute only: posting is overhead)


def _checked_stage_costs(schedule: Schedule, stage_costs: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    if len(stage_costs) != schedule.num_model_stages:
        raise ValueError(f"stage_costs has {len(stage_costs)} entries; {schedule.name} has "
                         f"{schedule.num_model_stages} model stages: give one mapping per model stage")
    for stage, entry in enumerate(stage_costs):
        unknown = set(entry) - {"F", "B", "W", "BW"}
        if unknown:
            raise ValueError(f"stage_costs[{stage}] has unknown keys {sorted(unknown)}; per stage use F, B and W, "
                             "and optionally BW (a whole backward where B and W are the split halves)")
    return [dict(entry) for entry in stage_costs]


def play(schedule: Schedule, costs: Mapping[str, float],
         stage_costs: Sequence[Mapping[str, float]] | None = None) -> tuple[dict[_Node, float], dict[_Node, float]] | None:
    """Every op's (start, end): the longest path through ``build_graph``'s edges, walked rank by
    rank as far as each can go (an op starts when its rank is free, the message it reads has
    arrived and the stage before it on the same rank has run). None when no rank can go on."""
    zero = 0 * costs["F"]
    start: dict[_Node, float] = {}
    end: dict[_Node, float] = {}
    sent: dict[tuple[str, int, int], float] = {}  # message -> when its send was posted
    posted: dict[tuple[str, int, int], float] = {}  # message -> when its receive was posted
    done: set[tuple[str, int, int]] = set()  # (F or G, stage, micro-batch) already run
    cursor, clock = [0] * schedule.num_ranks, [zero] * schedule.num_ranks
    progressed = True
    while progressed:
        progressed = False
        for rank, stream in enumerate(schedule.streams):
            while cursor[rank] < len(stream):
                op = stream[cursor[rank]]
                begin = _ready(schedule, op, clock[rank], sent, done, costs["comm"], posted, costs.get("wake", zero))
                if begin is None:
                    break
                node = (rank, cursor[rank])
                start[node], end[node] = begin, begin + _cost(op, costs, stage_costs, schedule)
                clock[rank] = end[node]
                for part in parts(op):
                    if is_send(part) and schedule.transfers(part):
                        sent[schedule.message_key(part)] = end[node]
                    elif is_recv(part) and schedule.transfers(part):
                        posted[schedule.message_key(part)] = begin
                if is_compute(op) and not isinstance(op, BackwardWeight):
                    done.add(("F" if isinstance(op, Forward) else "G", op.stage, op.micro_batch))  # type: ignore[union-attr]
                cursor[rank] += 1
                progressed = True
    finished = all(c == len(stream) for c, stream in zip(cursor, schedule.streams))
    return (start, end) if finished else None


def _ready(schedule: Schedule, op: Instruction, free: float, sent: Mapping[tuple[str, int, int], float],
           done: set[tuple[str, int, int]], comm: float, posted: Mapping[tuple[str, int, int], float] | None = None,
           wake: float = 0.0) -> float | None:
    """When ``op`` can start on a rank free from ``free``, or None while it must wait."""
    message = schedule.reads(op)
    if message is not None:
        if message not in sent:
            return None
        arrives = sent[message] + comm
        asked = (posted or {}).get(message)
        if wake and asked is not None and asked > sent[message]:  # the receive came late: a round trip
            arrives = max(arrives, asked + wake)
        return max(free, arrives)
    if isinstance(op, Forward) and op.stage > 0 and ("F", op.stage - 1, op.micro_batch) not in done:
        return None  # the previous stage is on this rank and has not run: only a cycle does that
    source = schedule.fed_by(op.micro_batch) if isinstance(op, Forward) and op.stage == 0 else None
    if source is not None and ("F", schedule.num_model_stages - 1, source) not in done:
        return None  # generation, first and last stage on this rank: the token is not sampled yet
    if isinstance(op, (Backward, BackwardInput)) and op.stage < schedule.num_model_stages - 1 \
            and ("G", op.stage + 1, op.micro_batch) not in done:
        return None
    return free


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
                     peak_held=_peak_held(schedule), loss_known=_loss_known(schedule, start, end, makespan),
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


def _peak_held(schedule: Schedule) -> tuple[int, ...]:
    """Per rank: activations of all its chunks held at once, at the worst point of its stream."""
    out = []
    for stream in schedule.streams:
        held = peak = 0
        for op in stream:
            if isinstance(op, Forward):
                held += 1
                peak = max(peak, held)
                held -= 0 if schedule.training else 1
            elif isinstance(op, (Backward, BackwardInput)):
                held -= 1
        out.append(peak)
    return tuple(out)


def _loss_known(schedule: Schedule, start: Mapping[_Node, float], end: Mapping[_Node, float],
                makespan: float) -> tuple[float, ...]:
    """When each rank learns the step's loss (``loss_message``): the end of the loss rank's
    last loss, the start of the op that reads a marked message elsewhere."""
    known = knows_loss_after(schedule)
    if known is None:
        return tuple(makespan for _ in schedule.streams)
    return tuple((end if rank == schedule.loss_rank else start)[(rank, known[rank] - 1)]
                 for rank in range(schedule.num_ranks))


def _cycle_error(schedule: Schedule, graph: nx.DiGraph) -> ScheduleError:
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:  # stuck without a cycle: a rank waits on a message sent too late
        cycle = []
    steps = " -> ".join(f"rank {u[0]} pos {u[1]} ({schedule.streams[u[0]][u[1]]})"
                        for u, _ in cycle)
    return ScheduleError(
        f"{schedule.name}: dependency cycle (would deadlock): {steps}; reorder the "
        f"streams so each op comes after what it depends on\n{schedule.table()}")
