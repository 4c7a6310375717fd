"""Schedule pictures: text table, Chrome trace, PNG (the command line, in a subprocess:
tests/dist/test_schedule_cli.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipegrid.schedules import build, picture, simulate, to_chrome_trace, to_png, to_text


def test_text_table_has_ranks_as_rows_and_idle_cells() -> None:
    text = to_text(build("1f1b", 3, 4))
    lines = text.splitlines()
    assert lines[1].startswith("rank 0 | 0F0 0F1 0F2   .")
    assert lines[3].startswith("rank 2 |   .   . 2F0 2B0 2B0 2F1")
    assert "bubble 0.3333" in lines[-1] and "held per rank [3, 2, 1]" in lines[-1]
    assert "rank 0" in build("gpipe", 2, 2).table()


def test_chrome_trace_from_sim_and_from_measured_events() -> None:
    trace = to_chrome_trace(simulate(build("gpipe", 2, 2)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1} and len(spans) == 8
    json.dumps(trace)
    measured = [(0, "0F0", 0.0, 0.5), (1, "1F0", 0.5, 1.25)]
    trace = to_chrome_trace(measured, us_per_unit=1e6)
    span = [e for e in trace["traceEvents"] if e["ph"] == "X"][1]
    assert span["pid"] == 1 and span["ts"] == 5e5 and span["dur"] == 7.5e5


def test_png_from_sim_and_events(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    to_png(simulate(build("zb_h1", 3, 4), {"F": 1, "B": 1, "W": 1}), str(tmp_path / "a.png"))
    to_png([(0, "0F0", 0.0, 1.0), (1, "1F0", 1.0, 2.0)], str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_measured_is_drawn_above_the_simulated_step_in_ms(tmp_path: Path, monkeypatch) -> None:
    sim = simulate(build("1f1b", 2, 2), {"F": 0.002, "B": 0.004, "W": 0.0})  # seconds
    measured = [(0, "0F0", 0.0, 0.003), (0, "0F1", 0.003, 0.005), (0, "0SA1+0RG0", 0.005, 0.0051),
                (1, "1F0", 0.004, 0.006), (1, "1B0", 0.006, 0.011)]
    seen = {}
    monkeypatch.setattr(picture, "draw", lambda panels, path, title: seen.update(panels=panels, title=title))
    to_png(sim, str(tmp_path / "x.png"), measured=measured, seconds=True)
    measured_panel, simulated_panel = seen["panels"]
    assert (measured_panel.name, simulated_panel.name) == ("measured", "simulated")
    assert measured_panel.seconds and simulated_panel.seconds  # one axis, in ms
    assert simulated_panel.marks and all(rank in (0, 1) for rank, _ in simulated_panel.marks)  # loss arrivals
    assert re.search(r"1f1b p=2 m=2 v=1: bubble measured 0\.\d+ vs simulated 0\.\d+", seen["title"])


def test_labels_only_where_they_fit() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2), dpi=picture._DPI)
    ax.set_xlim(0, 100)
    assert picture._fits(ax, "0F0", 20.0) and not picture._fits(ax, "0F0", 0.5)
    assert picture._fits(ax, "12W31", 20.0) and not picture._fits(ax, "12W31", 3.0)
    plt.close(fig)


def test_measured_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sim = simulate(build("zb_v", 2, 4, 2), {"F": 0.001, "B": 0.001, "W": 0.001})
    measured = [(rank, label, start * 1.2, end * 1.2) for rank, label, start, end in sim.events()]
    to_png(sim, str(tmp_path / "m.png"), measured=measured, seconds=True)
    assert (tmp_path / "m.png").stat().st_size > 5000
