"""benchmarks/schedule_table.py: the schedule table in docs/schedules.md is what the simulator says now."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_docs_schedule_table_is_the_simulators(tmp_path) -> None:
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "schedule_table.py"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["schedule"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["zb_v"]["bubble"] <= 0.25 * rows["1f1b"]["bubble"]
    assert rows["zb_v"]["peak_activations"] <= rows["1f1b"]["peak_activations"]
    assert rows["dualpipev"]["bubble"] < rows["zb_h1"]["bubble"] < rows["1f1b"]["bubble"]
    doc = (REPO / "docs" / "schedules.md").read_text()
    for name, row in rows.items():  # doc rows: | `name`... | chunks | placement | bubble | vs 1F1B | peak | messages |
        line = next(line for line in doc.splitlines() if line.startswith(f"| `{name}`"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2:] == [row["placement"], f"{row['bubble']:.3f}", f"{row['vs_1f1b']:.2f}",
                             f"{row['peak_activations']:g}", str(row["messages"])], line
    readme = (REPO / "README.md").read_text()  # its benchmark summary quotes three of the bubbles
    summary = next(line for line in readme.splitlines() if line.startswith("- Schedules, simulated"))
    for name, label in (("1f1b", "1F1B"), ("zb_h1", "ZB-H1"), ("zb_v", "ZB-V")):
        assert f"{rows[name]['bubble']:.3f} ({label}" in summary, summary
