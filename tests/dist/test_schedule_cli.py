"""The schedule command line (``python -m pipegrid.schedules``), run as users run it, in a
subprocess: the table, the bubble, the files it writes, and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipegrid.schedules", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_prints_table_and_bubble_and_writes_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, trace = tmp_path / "out.png", tmp_path / "out.json"
    run = _cli("1f1b", "--ranks", "4", "--micro-batches", "8", "--png", str(png),
               "--trace", str(trace))
    assert run.returncode == 0, run.stderr
    assert "rank 3 |" in run.stdout
    assert "simulated bubble fraction: 0.2727" in run.stdout
    assert png.stat().st_size > 1000 and json.loads(trace.read_text())["traceEvents"]


def test_cli_takes_the_v_schedules_own_chunks() -> None:
    run = _cli("zb_v", "--stages", "4", "--micro-batches", "8", "--streams")
    assert run.returncode == 0, run.stderr
    assert "virtual_stages=2 placement=v" in run.stdout and "0F0" in run.stdout and "7F0" in run.stdout
    assert "simulated bubble fraction: 0.0588" in run.stdout  # 3 idle slots of 51


def test_cli_refusal_is_a_clear_error() -> None:
    run = _cli("interleaved_1f1b", "--stages", "4", "--micro-batches", "6", "--virtual", "2")
    assert run.returncode == 2
    assert "set micro_batches=8" in run.stderr
