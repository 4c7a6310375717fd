"""Write a benchmark's result file: its rows and printed table, with when, where and on what
commit they were measured (the README quotes numbers from these files)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any


def write_record(path: str, rows: list[dict[str, Any]], table: list[str], **settings: Any) -> None:
    """``path`` gets {date, commit, cpus, torch, **settings, rows, table}; its folder is made."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpus": os.cpu_count(),
                   "torch": torch.__version__, **settings, "rows": rows, "table": "\n".join(table)}, f, indent=2)
