"""Pictures of a schedule: text timeline table, Chrome-trace JSON (Perfetto), PNG (matplotlib).

Each takes a Schedule, a SimResult, or measured events ``(rank, label, start, end)``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.simulate import Event, SimResult, simulate

__all__ = ["to_text", "to_chrome_trace", "to_png", "RENDER_COSTS"]

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
        return source.num_stages
    if isinstance(source, SimResult):
        return source.schedule.num_stages
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
        lines.append(f"bubble {float(result.bubble_fraction):.4f}, makespan "
                     f"{float(result.makespan):g}, peak in-flight {list(result.peak_inflight)}")
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


def to_png(source: Source, path: str, *, title: str | None = None) -> None:
    """Timeline picture: one row per rank, ops coloured by kind, bubbles hatched red."""
    import matplotlib  # lazy: an optional extra (pipegrid[viz])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = _events(source)
    ranks = _num_ranks(source, events)
    origin = min(e[2] for e in events)
    makespan = max(e[3] for e in events) - origin
    fig, ax = plt.subplots(figsize=(min(4 + makespan * 0.3, 40), 0.6 * ranks + 1.2))
    for rank in range(ranks):  # the bubble: whatever no op covers
        ax.barh(rank, makespan, left=0, height=0.8, color="#f6d5d5", hatch="//",
                edgecolor="#d9a0a0", linewidth=0)
    for rank, label, start, end in events:
        ax.barh(rank, end - start, left=start - origin, height=0.8,
                color=_COLOURS.get(_kind(label), "#999999"), edgecolor="white")
        if end - start > 0 and len(events) <= 600:
            ax.text(start - origin + (end - start) / 2, rank, label, ha="center",
                    va="center", fontsize=6, color="white")
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(title or _title(source))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(source: Source) -> str:
    if isinstance(source, Schedule):
        source = simulate(source, RENDER_COSTS)
    if isinstance(source, SimResult):
        s = source.schedule
        return (f"{s.name} p={s.num_stages} m={s.micro_batches} v={s.virtual_stages}: "
                f"bubble {float(source.bubble_fraction):.3f}")
    return "pipeline timeline (hatched: idle)"
