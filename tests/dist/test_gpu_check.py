"""benchmarks/gpu_check.sh's CPU-side logic: every step runs (tiny, on the CPU), the table
is written, a failed step is named with its last words, missing wheels name the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# loaded from its file: benchmarks/ on sys.path would shadow packages of the same names
# (benchmarks/kernels.py hid the `kernels` package transformers imports; now kernel_bandwidth.py)
_spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_report)

STEPS = ["environment", "gpu_tests", "kernels", "engine", "models", "gpt", "readme", "unit_tests"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # as the run's own limit: it took 4.4 minutes at load average 25
def test_cpu_mode_runs_every_step_and_writes_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PIPEGRID_COMMIT": "test"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    statuses = dict(line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert list(statuses) == STEPS
    # --cpu still runs tests/gpu: they skip without CUDA (skipped, not failed) and run where it is present
    assert statuses["gpu_tests"] == ("pass" if torch.cuda.is_available() else "skip"), statuses
    assert all(statuses[s] == "pass" for s in STEPS if s != "gpu_tests"), statuses
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["env"]["commit"] == "test" and data["env"]["kernels_backend"] == "torch"
    assert {k["op"] for k in data["kernels"]} == {"pack", "unpack"}
    assert all(row["ok"] for row in data["engine"]["correctness"])
    assert data["engine"]["overhead"]["engine_ms"] > 0
    assert data["gpt"]["steps"] == 3 and data["gpt"]["tokens_per_s"] > 0
    systems = {r["system"]: r for r in data["models"]["models"][0]["systems"]}
    assert systems["plain eager"]["status"] == systems["pipegrid eager"]["status"] == "pass", systems
    assert systems["plain compiled"]["tokens_per_s"] > 0 and len(systems["pipegrid eager"]["losses"]) == 3
    # on the CPU fp8 is refused (or compile.* not yet a key): skipped, saying why, never failed
    assert systems["pipegrid compiled+fp8"]["status"] == "skip" and systems["pipegrid compiled+fp8"]["note"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| gpt | pass |" in table and "| readme | pass |" in table and "host overhead" in table
    assert "tokens/s" in table and "| pipegrid eager |" in table and "what must be true" in table
    assert table in run.stdout  # printed as well


def test_a_failed_step_is_named_with_its_last_line_and_fails_the_run(tmp_path):
    (tmp_path / "steps.tsv").write_text("environment\tpass\t1\tenvironment.log\n"
                                        "kernels\tfail\t3\tkernels.log\ngpt\ttimeout\t150\tgpt.log\n")
    (tmp_path / "environment.log").write_text("{}\n")
    (tmp_path / "kernels.log").write_text("Traceback ...\nRuntimeError: CUDA error: no kernel image\n\n")
    (tmp_path / "gpt.log").write_text("step 10/150\n")
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0"}))
    markdown, data = gpu_report.build_report(tmp_path)
    assert "| kernels | fail | 3 | RuntimeError: CUDA error: no kernel image |" in markdown
    assert "| gpt | timeout | 150 | step 10/150 |" in markdown
    assert "NVIDIA H200" in markdown and "kernels: no result" in markdown
    assert gpu_report.main([str(tmp_path)]) == 1
    assert (tmp_path / "gpu_check.md").read_text() == markdown


def _kernel_table(cases: list[tuple]) -> list[dict]:
    """kernel_bandwidth.py's rows from (op, method, tensors, total MB, us, fraction of copy bandwidth)."""
    keys = ("op", "method", "tensors", "total_mb", "time_us", "copy_fraction")
    return [dict(zip(keys, case)) for case in cases]


def test_kernel_headlines_pick_the_fused_path_and_the_goal_cases():
    rows = _kernel_table([
        ("pack", "pipegrid/cupy", 10, 1024.0, 500.0, 0.91), ("pack", "pipegrid/torch", 10, 1024.0, 600.0, 0.7),
        ("pack", "torch.cat", 1000, 1.0, 400.0, 0.1), ("pack", "_flatten_dense_tensors", 1000, 1.0, 300.0, 0.1),
        ("pack", "pipegrid/cupy", 1000, 1.0, 50.0, 0.8),
        ("unpack", "pipegrid/cupy", 10, 1024.0, 520.0, 0.88), ("unpack", "split+copy_", 1000, 1.0, 900.0, 0.1),
        ("unpack", "pipegrid/cupy", 1000, 1.0, 60.0, 0.7)])
    pack, unpack = gpu_report._kernel_rows({"rows": rows, "backends": ["torch", "cupy"]})
    assert pack == {"op": "pack", "method": "pipegrid/cupy", "large_mb": 1024.0, "large_copy_fraction": 0.91,
                    "small_vs_torch.cat": 8.0, "small_vs__flatten_dense_tensors": 6.0}
    assert unpack["large_copy_fraction"] == 0.88 and unpack["small_vs_split+copy_"] == 15.0


def test_missing_hydra_without_wheels_names_the_fix(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "gpu_check.sh", tmp_path / "benchmarks")
    python = tmp_path / "python"  # a Python on which hydra cannot be imported
    python.write_text(f'#!/bin/sh\ncase "$*" in *"import hydra"*) exit 1;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    run = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out")}, timeout=60)
    assert run.returncode == 1
    assert "hydra-core is missing and .whl/ holds no wheels" in run.stderr and "--download" in run.stderr


def test_kernel_headlines_include_what_auto_picks():
    rows = _kernel_table([
        ("unpack", "pipegrid/torch", 10, 1024.0, 500.0, 0.90), ("unpack", "pipegrid/cupy", 10, 1024.0, 660.0, 0.68),
        ("unpack", "pipegrid/auto", 10, 1024.0, 505.0, 0.89), ("unpack", "split+copy_", 1000, 1.0, 900.0, 0.1),
        ("unpack", "pipegrid/torch", 1000, 1.0, 800.0, 0.1), ("unpack", "pipegrid/cupy", 1000, 1.0, 60.0, 0.7),
        ("unpack", "pipegrid/auto", 1000, 1.0, 90.0, 0.6),
        ("pack", "torch.cat", 1000, 1.0, 400.0, 0.1), ("pack", "pipegrid/cupy", 1000, 1.0, 100.0, 0.5),
        ("pack", "pipegrid/auto", 1000, 1.0, 100.0, 0.5), ("pack", "pipegrid/torch", 1000, 1.0, 300.0, 0.2)])
    kernels = {"rows": rows, "backends": ["torch", "cupy", "auto"]}
    assert [(k["op"], k["method"]) for k in gpu_report._kernel_rows(kernels)] == [
        ("pack", "pipegrid/cupy"), ("unpack", "pipegrid/cupy"), ("pack", "pipegrid/auto"), ("unpack", "pipegrid/auto")]
    claims = {c["claim"]: (c["measured"], c["holds"]) for c in gpu_report.must_be_true(None, kernels)}
    assert claims["unpack pipegrid/cupy >= 80% of copy bandwidth at the largest size"] == ("68%", "NO")
    assert claims["unpack pipegrid/auto >= 80% of copy bandwidth at the largest size"] == ("89%", "yes")
    assert claims["unpack pipegrid/auto >= 10x split+copy_, 1000 small tensors"] == ("10.0x", "yes")
    assert claims["kernels.backend=auto never slower than the torch path (within 5%)"][1] == "yes"


def test_the_kernel_host_time_is_reported_beside_the_bandwidth(tmp_path):
    times = {"pack: torch.cat": [1500.0, 1600.0], "pack: FlatBuffer.pack_from/cupy": [300.0, 320.0],
             "unpack: split+copy_": [6000.0, 7000.0], "unpack: FlatBuffer.unpack_to/cupy": [400.0, 410.0],
             "phase: layout.check": [150.0, 150.0]}
    host = {"device": "cuda", "tensors": 1000, "median_us": {"this tree": times}}
    (tmp_path / "kernels_cuda.json").write_text(json.dumps({"rows": [], "copy_gb_s": 1.0, "host": host}))
    markdown, data = gpu_report.build_report(tmp_path)
    assert data["kernels_host"] == host
    assert "| pack: FlatBuffer.pack_from/cupy | 300.0 | 320.0 | 5.00x |" in markdown
    assert "| unpack: FlatBuffer.unpack_to/cupy | 400.0 | 410.0 | 15.00x |" in markdown
    assert "phases (host us): layout.check 150" in markdown


def test_model_claims_compare_with_the_plain_compiled_loop_and_say_why_when_not_measured():
    def row(system, tps=None, mfu=None, peak=None, status="pass", note=""):
        return {"system": system, "status": status, "note": note, "tokens_per_s": tps, "mfu": mfu, "peak_gib": peak,
                "losses": []}
    models = {"table": "(table)", "models": [
        {"model": "llama-1.1b", "today_peak_gib": 36.5, "fp8_loss_gap": {"max_rel": 0.012, "final_rel": 0.004, "steps": 18},
         "systems": [row("plain compiled", 66_400, 0.472), row("pipegrid compiled", 71_000, 0.505, 30.1),
                     row("pipegrid compiled+fp8", 80_000, 0.57, 28.0)]},
        {"model": "gpt2-124m", "today_peak_gib": 19.3, "fp8_loss_gap": None,
         "systems": [row("plain compiled", 400_700, 0.346),
                     row("pipegrid compiled", status="skip", note="config refused: unknown config keys ['compile']")]}]}
    claims = {c["claim"]: (c["measured"], c["holds"]) for c in gpu_report.must_be_true(models, None)}
    assert claims["llama-1.1b: pipegrid compiled >= 1.05x plain compiled, MFU >= 50%"] == ("1.07x, MFU 50.5%", "yes")
    assert claims["llama-1.1b: pipegrid compiled+fp8 >= 1.3x plain compiled"] == ("1.20x, MFU 57.0%", "NO")
    assert claims["gpt2-124m: pipegrid compiled >= 1.0x plain compiled, MFU >= 35%"] == (
        "config refused: unknown config keys ['compile']", "n/a")
    assert claims["llama-1.1b: pipegrid compiled peak memory <= today's 36.5 GiB"] == ("30.1 GiB", "yes")
    assert claims["llama-1.1b: fp8 loss tracks bf16 (reported)"] == ("max 1.20%, final 0.40% over 18 steps", "n/a")
