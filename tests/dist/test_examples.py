"""The examples end to end, as a user runs them (subprocesses, tiny models, a few steps):
one Hydra output directory per run, rank 0's logs, checkpoints that resume, the trace,
multirun, torchrun, and a failing worker's traceback."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.seq_len=16", "data.micro_batch_size=4",
            "train.steps=4", "train.log_interval=1", "eval.interval=2", "eval.batches=1", "sample.length=8"]


def run(script: str, *args: str, cwd: Path, prefix: tuple = (sys.executable,),
        timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = (*args, "comm.backend=gloo")  # these tests mean CPU ranks, also on a machine with a GPU
    return subprocess.run([*prefix, str(REPO / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 4-step GPT run at pipe=2 that checkpoints and traces."""
    root = tmp_path_factory.mktemp("gpt")
    proc = run("train_gpt.py", *TINY_GPT, f"hydra.run.dir={root / 'run1'}", f"checkpoint.dir={root / 'ckpt'}",
               "checkpoint.interval=2", "trace.enabled=true", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_gpt_prints_loss_validation_entropy_and_sample(first_run):
    root, proc = first_run
    out = proc.stdout
    assert out.count("step 4/4: loss") == 1  # rank 0 logs, the others do not
    assert "tokens/s" in out and "unigram entropy" in out and "sample, continuing" in out
    rows = metrics(root / "run1")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert {p.name for p in root.iterdir()} == {"run1", "ckpt"}  # one output directory for all ranks
    assert (root / "run1" / ".hydra" / "config.yaml").is_file() and (root / "run1" / "train_gpt.log").is_file()


def test_gpt_resumes_from_its_checkpoint(first_run):
    root, _ = first_run
    assert (root / "ckpt" / "latest").exists()
    proc = run("train_gpt.py", *TINY_GPT, "train.steps=6", f"hydra.run.dir={root / 'run2'}",
               f"checkpoint.dir={root / 'ckpt'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert [int(r["step"]) for r in metrics(root / "run2")] == [5, 6]


def test_gpt_trace_names_every_rank(first_run):
    root, proc = first_run
    trace = json.loads((root / "run1" / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert {e.get("pid") for e in events if e.get("ph") == "X"} >= {0, 1}
    assert "bubble measured" in proc.stdout and "vs simulated" in proc.stdout
    if importlib.util.find_spec("matplotlib"):  # the PNG needs the [viz] extra
        assert (root / "run1" / "trace.png").is_file()


def test_failing_worker_ends_the_run_with_its_traceback(tmp_path):
    proc = run("train_gpt.py", *TINY_GPT, "data.text=/no/such/file.txt", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode != 0
    assert "raised:" in proc.stderr and "Traceback" in proc.stderr
    assert "data.text='/no/such/file.txt' is neither 'pydoc' nor an existing file" in proc.stderr


def test_bad_config_fails_before_any_worker(tmp_path):
    proc = run("train_gpt.py", "topology=pipe2_tensor2", "model.n_head=3", "model.n_embd=96", cwd=tmp_path)
    assert proc.returncode != 0
    assert "set model.n_head=4" in proc.stderr and "raised:" not in proc.stderr


def test_gpt_multirun_launches_each_job(tmp_path):
    """One sweep over a loop-placed and a V-placed schedule: the app builds its module for either."""
    proc = run("train_gpt.py", "-m", "schedule=gpipe,zb_v", *TINY_GPT, "train.steps=2", "sample.length=0",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, schedule in enumerate(["gpipe", "zb_v"]):
        assert f"schedule={schedule}" in (tmp_path / "sweep" / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert len(metrics(tmp_path / "sweep" / str(job))) == 2


def test_gpt_under_torchrun_keeps_one_output_dir(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    proc = run("train_gpt.py", *TINY_GPT, "sample.length=0", f"hydra.run.dir={tmp_path / 'run'}",
               prefix=torchrun, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # rank 1 wrote no directory of its own
    assert len(metrics(tmp_path / "run")) == 4 and proc.stdout.count("step 4/4: loss") == 1


def test_mlp_example_learns(tmp_path):
    proc = run("train_mlp.py", "train.steps=60", "train.log_interval=20", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mse = [float(line.split("mse ")[1].split()[0]) for line in proc.stdout.splitlines() if "mse" in line]
    assert len(mse) == 4 and mse[-1] < 0.5 * mse[0]
