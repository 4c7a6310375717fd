"""Measured timelines: merge every rank's executed instructions into one Chrome trace
(opens in Perfetto) and a PNG, and compare the measured bubble with the simulator's."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch.distributed as dist

from pipegrid.schedules import simulate
from pipegrid.schedules.render import to_chrome_trace, to_png

Event = tuple[int, str, float, float]
_COMPUTE = ("F", "B", "I", "W")


def _kind(label: str) -> str:
    letters = "".join(c for c in label if c.isalpha())
    return letters if letters in _COMPUTE else ""


def measured_bubble(events: list[Event]) -> float:
    """Idle share of the step on each rank (time outside F/B/I/W), averaged over ranks."""
    if not events:
        return 0.0
    start, end = min(e[2] for e in events), max(e[3] for e in events)
    span = end - start
    ranks = sorted({e[0] for e in events})
    busy = {r: sum(e[3] - e[2] for e in events if e[0] == r and _kind(e[1])) for r in ranks}
    return sum(1.0 - busy[r] / span for r in ranks) / len(ranks) if span > 0 else 0.0


def simulated_bubble(schedule: Any, events: list[Event]) -> float:
    """The simulator's bubble for the same schedule, fed the measured mean op durations."""
    costs = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.0}
    for kind in _COMPUTE:
        durations = [e[3] - e[2] for e in events if _kind(e[1]) == kind]
        if durations:
            costs["B" if kind == "I" else kind] = statistics.mean(durations)
    if not schedule.split_backward:
        costs["W"] = 0.0
    return simulate(schedule, costs).bubble_fraction


def write_trace(engine: Any, path: str) -> dict[str, float] | None:
    """Collective: rank 0 writes the merged trace of the last traced step (and a PNG beside it).

    Returns ``{"measured_bubble", "simulated_bubble"}`` on rank 0, None elsewhere. Only the
    ranks of data/tensor coordinate 0 are compared with the simulator (one pipeline).
    """
    mine = engine.last_timeline()
    if not mine:
        raise RuntimeError("no timeline recorded; set trace.enabled=true and run train_batch first")
    gathered: list[Any] = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine)
    if engine.groups.rank != 0:
        return None
    events = [e for rank_events in gathered for e in rank_events]
    origin = min(e[2] for e in events)
    events = [(r, label, s - origin, e - origin) for r, label, s, e in events]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_chrome_trace(events, us_per_unit=1e6), f)
    try:
        to_png(events, os.path.splitext(path)[0] + ".png", title="pipegrid measured timeline")
    except ImportError:  # matplotlib is the optional [viz] extra
        pass
    pipeline = [engine.topology.rank(pipe=p, data=0, tensor=0) for p in range(engine.topology.pipe)]
    one = [(pipeline.index(r), label, s, e) for r, label, s, e in events if r in pipeline]
    return {"measured_bubble": measured_bubble(one), "simulated_bubble": simulated_bubble(engine.schedule, one)}
