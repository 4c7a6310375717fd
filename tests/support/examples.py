"""The examples as a user runs them: a script of examples/ in a subprocess on CPU ranks, and
the metrics.csv it writes; a tiny GPT's overrides."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.seq_len=16", "data.micro_batch_size=4",
            "train.steps=4", "train.log_interval=1", "eval.interval=2", "eval.batches=1", "sample.length=8"]


def run(script: str, *args: str, cwd: Path, prefix: tuple = (sys.executable,),
        timeout: float = 120) -> subprocess.CompletedProcess:
    """``examples/<script> args`` in a subprocess, its ranks on gloo; the finished process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = (*args, "comm.backend=gloo")  # these tests mean CPU ranks, also on a machine with a GPU
    return subprocess.run([*prefix, str(REPO / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    """The rows of the metrics.csv a run wrote into its Hydra output directory."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
