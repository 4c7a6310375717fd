"""Pictures of a schedule: text timeline table, Chrome-trace JSON (Perfetto), PNG (matplotlib).

Each takes a Schedule, a SimResult, or measured events ``(rank, label, start, end)``; the
PNG draws a measured step above its simulation on one axis (``picture.py`` draws).
"""

from __future__ import annotations

from typing import Any, Union
from collections.abc import Iterable, Sequence

from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.simulate import Event, SimResult, simulate

__all__ = ["to_text", "to_chrome_trace", "to_png", "measured_bubble", "RENDER_COSTS"]

RENDER_COSTS = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.0}
"""Costs used to draw a bare Schedule: F=1, full backward 2 (I=1, W=1 when split)."""
Source = Union[Schedule, SimResult, Iterable[Event]]
_COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#55a868", "W": "#dd8452"}


def _events(source: Source) -> list[Event]:
    if isinstance(source, Schedule):
        source = simulate(source, RENDER_COSTS)
    if isinstance(source, SimResult):
        return source.events()
    events = [(int(r), str(label), float(s), float(e)) for r, label, s, e in source]
    if not events:
        raise ValueError("no events to render; pass a Schedule, a SimResult or "
                         "(rank, label, start, end) tuples")
    return events


def _num_ranks(source: Source, events: Sequence[Event]) -> int:
    if isinstance(source, Schedule):
        return source.num_ranks
    if isinstance(source, SimResult):
        return source.schedule.num_ranks
    return max(e[0] for e in events) + 1


def to_text(source: Source, slot: float | None = None) -> str:
    """Ranks as rows, time slots as columns (idle ``.``); ``slot`` defaults to the shortest op.

    An op longer than a slot repeats its label in every slot it covers.
    """
    events = _events(source)
    timed = [e for e in events if e[3] > e[2]]
    slot = float(slot or min((e[3] - e[2] for e in timed), default=1.0))
    origin = min((e[2] for e in events), default=0.0)
    rows: list[list[str]] = [[] for _ in range(_num_ranks(source, events))]
    for rank, label, start, end in timed:
        first, stop = round((start - origin) / slot), round((end - origin) / slot)
        row = rows[rank]
        row.extend(["."] * (stop - len(row)))
        for cell in range(first, max(stop, first + 1)):
            row[cell] = label
    width = max([len(str(max(len(r) for r in rows)))] + [len(e[1]) for e in timed] + [1])
    length = max(len(r) for r in rows)
    lines = ["t      | " + " ".join(f"{t:>{width}}" for t in range(length))]
    for rank, row in enumerate(rows):
        row = row + ["."] * (length - len(row))
        lines.append(f"rank {rank:<2}| " + " ".join(f"{c:>{width}}" for c in row))
    if isinstance(source, (Schedule, SimResult)):
        result = source if isinstance(source, SimResult) else simulate(source, RENDER_COSTS)
        lines.append(f"bubble {float(result.bubble_fraction):.4f}, makespan {float(result.makespan):g}, "
                     f"peak in-flight per stage {list(result.peak_inflight)}, held per rank {list(result.peak_held)}")
    return "\n".join(lines)


def to_chrome_trace(source: Source, *, us_per_unit: float = 1000.0) -> dict[str, Any]:
    """Chrome trace JSON (``json.dump`` it; opens in Perfetto): one pid/tid per rank.

    Times are multiplied by ``us_per_unit`` (1 simulated unit = 1 ms by default; pass
    1e6 for events measured in seconds).
    """
    events = _events(source)
    trace: list[dict[str, Any]] = []
    for rank in range(_num_ranks(source, events)):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank,
                      "args": {"name": f"rank {rank}"}})
    for rank, label, start, end in events:
        trace.append({"name": label, "cat": _kind(label), "ph": "X", "pid": rank,
                      "tid": rank, "ts": start * us_per_unit,
                      "dur": (end - start) * us_per_unit})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def _kind(label: str) -> str:
    """F, B, I, W from a compact label such as ``1F3``; the label itself otherwise."""
    letters = label.strip("0123456789")
    return letters if letters in _COLOURS else label


def to_png(source: Source, path: str, *, measured: Iterable[Event] | None = None, title: str | None = None,
           seconds: bool = False) -> None:
    """One timeline picture for simulated and measured steps: a row per rank, ops coloured
    by kind (legend), labels only where they fit, idle time hatched red, and the loss's
    arrival marked. With ``measured`` (events in seconds, as ``trace.enabled`` records)
    the measured step is drawn above ``source`` on one time axis in ms, and the title
    gives both bubbles. ``seconds``: ``source``'s times are seconds too (drawn in ms).
    """
    from pipegrid.schedules import picture  # lazy: matplotlib is an optional extra (pipegrid[viz])

    panels = []
    if measured is not None:
        events = [(int(r), str(label), float(s), float(e)) for r, label, s, e in measured]
        panels.append(picture.Panel("measured", events, measured_bubble(events), seconds=True))
        seconds = True
    if isinstance(source, Schedule):
        source = simulate(source, RENDER_COSTS)
    if isinstance(source, SimResult):
        marks = list(enumerate(float(t) for t in source.loss_known)) if source.schedule.training else []
        panels.append(picture.Panel("simulated", source.events(), float(source.bubble_fraction), seconds,
                                    ranks=source.schedule.num_ranks, marks=marks))
    elif measured is None:
        events = _events(source)
        panels.append(picture.Panel("measured", events, measured_bubble(events), seconds=seconds))
    picture.draw(panels, path, title or _title(source, panels))


def measured_bubble(events: Sequence[Event]) -> float:
    """Idle share of the step on each rank (time outside F/B/I/W), averaged over ranks."""
    if not events:
        return 0.0
    start, end = min(e[2] for e in events), max(e[3] for e in events)
    ranks = sorted({e[0] for e in events})
    busy = {r: sum(e[3] - e[2] for e in events if e[0] == r and _kind(e[1]) in _COLOURS) for r in ranks}
    return sum(1.0 - busy[r] / (end - start) for r in ranks) / len(ranks) if end > start else 0.0


def _title(source: Source, panels: list[Any]) -> str:
    bubbles = " vs ".join(f"{panel.name} {panel.bubble:.3f}" for panel in panels)
    if isinstance(source, SimResult):
        s = source.schedule
        return f"{s.name} p={s.num_ranks} m={s.micro_batches} v={s.virtual_stages}: bubble {bubbles}"
    return f"pipeline timeline: bubble {bubbles}"
