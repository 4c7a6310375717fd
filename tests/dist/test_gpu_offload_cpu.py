"""benchmarks/gpu_offload.py --cpu: the one-GPU offload script's whole path (a try in its own
process, hf.from_config, ZeRO-1 with offload, the table and the JSON record) on a tiny Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_cpu_mode_trains_a_tiny_llama_and_records_it(tmp_path):
    out = tmp_path / "gpu_offload.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/gpu_offload.py", "--cpu", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| tiny | 0.11M | trained |" in done.stdout, done.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "trained" and row["tokens_per_s"] > 0 and row["peak_host_gib"] > 0
