"""Measured timelines: merge every rank's executed instructions into one Chrome trace
(opens in Perfetto) and a PNG of the measured step above its simulation, and compare the
measured bubble with the simulator's."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Protocol

import torch.distributed as dist

from pipegrid.schedules import SimResult, simulate
from pipegrid.schedules.render import measured_bubble, to_chrome_trace, to_png
from pipegrid.schedules.schedule import Schedule
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups

__all__ = ["measured_bubble", "simulated", "simulated_bubble", "write_trace"]

Event = tuple[int, str, float, float]
_COMPUTE = ("F", "B", "I", "W")


def _kind(label: str) -> str:
    letters = label.strip("0123456789*")
    return letters if letters in _COMPUTE else ""


def _stage(label: str) -> int:
    """The model stage of a compute label such as ``3F0`` (the leading number)."""
    digits = ""
    for char in label:
        if not char.isdigit():
            break
        digits += char
    return int(digits)


def _costs(durations: dict[str, list[float]], fallback_forward: float = 1.0) -> dict[str, float]:
    """F, B, W from measured durations per kind: a split backward as I and W apart."""
    means = {kind: statistics.mean(values) for kind, values in durations.items() if values}
    forward = means.get("F", fallback_forward)
    costs = {"F": forward, "B": 2.0 * forward, "W": 0.0}
    if "I" in means:  # split: B is the input half, W the weight half, a full B their sum
        costs["B"], costs["W"] = means["I"], means.get("W", 0.0)
    elif "B" in means:
        costs["B"] = means["B"]
    return costs


def simulated(schedule: Any, events: list[Event]) -> SimResult:
    """The simulator's step for the same schedule, fed the measured mean op durations (seconds),
    model stage by model stage (the first stage has no input gradient, the last adds the loss).

    A full backward B is costed as the measured B; a split one as I and W apart.
    """
    compute = [(_stage(e[1]), _kind(e[1]), e[3] - e[2]) for e in events if _kind(e[1])]
    overall = _costs({kind: [d for _, k, d in compute if k == kind] for kind in _COMPUTE})
    stage_costs = [_costs({kind: [d for s, k, d in compute if s == stage and k == kind] for kind in _COMPUTE},
                          overall["F"]) for stage in range(schedule.num_model_stages)]
    return simulate(schedule, {**overall, "comm": 0.0}, stage_costs)


def simulated_bubble(schedule: Any, events: list[Event]) -> float:
    """The simulator's bubble for the same schedule, fed the measured mean op durations."""
    return float(simulated(schedule, events).bubble_fraction)


class Traced(Protocol):
    """What writing a trace reads of an engine (``PipelineEngine`` is one)."""

    groups: ProcessGroups
    topology: Topology
    schedule: Schedule

    def last_timeline(self) -> list[tuple[int, str, float, float]]: ...


def write_trace(engine: Traced, path: str) -> dict[str, float] | None:
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
    pipeline = [engine.topology.rank(pipe=p, data=0, tensor=0) for p in range(engine.topology.pipe)]
    one = [(pipeline.index(r), label, s, e) for r, label, s, e in events if r in pipeline]
    sim = simulated(engine.schedule, one)
    try:
        to_png(sim, os.path.splitext(path)[0] + ".png", measured=one, seconds=True)
    except ImportError:  # matplotlib is the optional [viz] extra
        pass
    return {"measured_bubble": measured_bubble(one), "simulated_bubble": float(sim.bubble_fraction)}
