"""pipegrid.schedules and pipegrid.plan, which design.md keeps free of torch, import none of
it: each checked in a fresh interpreter (this one imported torch long ago)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_leaves_torch_out() -> None:
    code = "import sys, pipegrid.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, pipegrid.schedules; assert 'torch' not in sys.modules, 'torch!'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
