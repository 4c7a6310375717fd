"""Schedule pictures: text table, Chrome trace, PNG, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipegrid.schedules import build, simulate, to_chrome_trace, to_png, to_text

REPO = Path(__file__).resolve().parents[2]


def test_text_table_has_ranks_as_rows_and_idle_cells() -> None:
    text = to_text(build("1f1b", 3, 4))
    lines = text.splitlines()
    assert lines[1].startswith("rank 0 | 0F0 0F1 0F2   .")
    assert lines[3].startswith("rank 2 |   .   . 2F0 2B0 2B0 2F1")
    assert "bubble 0.3333" in lines[-1]
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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipegrid.schedules", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_prints_table_and_bubble_and_writes_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, trace = tmp_path / "out.png", tmp_path / "out.json"
    run = _cli("1f1b", "--stages", "4", "--micro-batches", "8", "--png", str(png),
               "--trace", str(trace))
    assert run.returncode == 0, run.stderr
    assert "rank 3 |" in run.stdout
    assert "simulated bubble fraction: 0.2727" in run.stdout
    assert png.stat().st_size > 1000 and json.loads(trace.read_text())["traceEvents"]


def test_cli_refusal_is_a_clear_error() -> None:
    run = _cli("interleaved_1f1b", "--stages", "4", "--micro-batches", "6", "--virtual", "2")
    assert run.returncode == 2
    assert "set micro_batches=8" in run.stderr
