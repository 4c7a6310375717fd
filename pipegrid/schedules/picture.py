"""Drawing timelines with matplotlib (the optional ``viz`` extra): ``render.to_png`` calls it.

One panel per timeline (measured above simulated), sharing the time axis: a row per
rank, compute coloured by kind, transfers and collectives as thin grey bars, idle time
hatched, labels only where they fit, and a legend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

__all__ = ["Panel", "draw"]

Event = tuple[int, str, float, float]
_COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#8fd19e", "W": "#dd8452"}
_NAMES = {"F": "forward", "B": "backward", "I": "backward, input half", "W": "backward, weight half"}
_OTHER = "#9a9a9a"
_IDLE = {"facecolor": "#f6d5d5", "hatch": "//", "edgecolor": "#d9a0a0", "linewidth": 0}
_FONT = 6.5  # points
_DPI = 120


@dataclass
class Panel:
    """One timeline: its events ``(rank, label, start, end)``, bubble and loss marks."""

    name: str
    events: list[Event]
    bubble: float
    seconds: bool = False
    """Times are seconds (drawn in ms); otherwise the simulator's cost units."""
    ranks: int | None = None
    marks: list[tuple[int, float]] = field(default_factory=list)
    """(rank, time) where the rank learns the step's loss."""

    def rows(self) -> int:
        return self.ranks or (max(e[0] for e in self.events) + 1 if self.events else 1)


def _kind(label: str) -> str:
    letters = label.strip("0123456789")
    return letters if letters in _COLOURS else ""


def _scaled(panel: Panel, origin: float) -> tuple[list[Event], list[tuple[int, float]]]:
    scale = 1e3 if panel.seconds else 1.0
    events = [(r, label, (s - origin) * scale, (e - origin) * scale) for r, label, s, e in panel.events]
    return events, [(r, (t - origin) * scale) for r, t in panel.marks]


def _fits(ax: Any, label: str, width: float) -> bool:
    """Whether ``label`` fits in a bar ``width`` data units wide at the axes' current scale."""
    x0, x1 = ax.get_xlim()
    pixels = width / (x1 - x0) * ax.get_window_extent().width
    return pixels >= 0.62 * _FONT * _DPI / 72 * len(label) + 2


def _draw_panel(ax: Any, panel: Panel, events: list[Event], marks: list[tuple[int, float]], end: float) -> None:
    rows = panel.rows()
    finish = max((e[3] for e in events), default=end)
    for rank in range(rows):  # the bubble: whatever no compute covers, up to this step's end
        ax.barh(rank, finish, left=0, height=0.8, **_IDLE)
    for rank, label, start, stop in events:
        kind = _kind(label)
        if kind:
            ax.barh(rank, stop - start, left=start, height=0.8, color=_COLOURS[kind], edgecolor="white",
                    linewidth=0.3)
        else:  # a transfer, a wait for one, or a collective: thin, under the row's compute
            ax.barh(rank + 0.3, max(stop - start, 0.0), left=start, height=0.2, color=_OTHER, linewidth=0)
    for rank, when in marks:
        ax.plot([when], [rank - 0.48], marker="v", color="black", markersize=4, linestyle="none")
    ax.set_yticks(range(rows), [f"rank {r}" for r in range(rows)])
    ax.set_ylim(rows - 0.5, -0.6)
    ax.set_ylabel(f"{panel.name}\nbubble {panel.bubble:.3f}", fontsize=8)


def _label(ax: Any, events: list[Event]) -> None:
    for rank, label, start, stop in events:
        if _kind(label) and _fits(ax, label, stop - start):
            ax.text((start + stop) / 2, rank, label, ha="center", va="center", fontsize=_FONT, color="white")


def _legend(fig: Any, panels: Sequence[Panel]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    kinds = sorted({_kind(e[1]) for p in panels for e in p.events} - {""}, key="FBIW".index)
    handles = [Patch(color=_COLOURS[k], label=f"{k}: {_NAMES[k]}") for k in kinds]
    handles += [Patch(color=_OTHER, label="transfer / collective"), Patch(label="idle", **_IDLE)]
    if any(p.marks for p in panels):
        handles.append(Line2D([], [], marker="v", color="black", linestyle="none", label="rank has the loss"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def draw(panels: Sequence[Panel], path: str, title: str) -> None:
    """Write ``panels`` stacked on one time axis to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min((e[2] for p in panels for e in p.events), default=0.0)
    scaled = [_scaled(panel, origin) for panel in panels]
    end = max((e[3] for events, _ in scaled for e in events), default=1.0)
    ops = max((sum(1 for e in events if e[0] == 0 and _kind(e[1])) for events, _ in scaled), default=1)
    rows = sum(panel.rows() for panel in panels)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, dpi=_DPI,
                             figsize=(min(max(8.0, 2 + ops * 0.32), 40.0), 0.42 * rows + 0.9 * len(panels) + 1.0),
                             gridspec_kw={"height_ratios": [panel.rows() for panel in panels]})
    for ax, panel, (events, marks) in zip(axes[:, 0], panels, scaled):
        _draw_panel(ax, panel, events, marks, end)
    axes[-1, 0].set_xlim(0, end * 1.01)
    axes[-1, 0].set_xlabel("time (ms)" if panels[-1].seconds else "time (cost units: F = 1)")
    fig.suptitle(title, fontsize=10)
    _legend(fig, panels)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    for ax, (events, _) in zip(axes[:, 0], scaled):
        _label(ax, events)  # after the layout: whether a label fits depends on the final scale
    fig.savefig(path)
    plt.close(fig)
