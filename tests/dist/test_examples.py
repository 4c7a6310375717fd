"""The examples end to end, as a user runs them (subprocesses, tiny models, a few steps):
one Hydra output directory per run, rank 0's logs, checkpoints that resume (at another pipe
degree too), the trace, multirun, torchrun, a failing worker's traceback, and the README's
zero-bubble bf16 ZeRO-1 job."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys

import pytest

from tests.support.examples import TINY_GPT, metrics, run

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


def test_gpt_resumes_from_its_checkpoint_at_pipe_4(first_run):
    """Set back to step 2's checkpoint, as if stopped there, the job resumes at pipe=4 with its
    optimizer state, continues the run that never stopped, and trains on past its end."""
    root, _ = first_run
    ckpt = root / "ckpt"
    assert (ckpt / "latest").read_text() == "step_00000004"
    (ckpt / "latest").write_text("step_00000002")
    shutil.rmtree(ckpt / "step_00000004")
    proc = run("train_gpt.py", *TINY_GPT, "train.steps=6", "topology=pipe4", f"hydra.run.dir={root / 'run2'}",
               f"checkpoint.dir={ckpt}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    before = {int(r["step"]): float(r["loss"]) for r in metrics(root / "run1")}
    after = {int(r["step"]): float(r["loss"]) for r in metrics(root / "run2")}
    assert sorted(after) == [3, 4, 5, 6]
    for step in (3, 4):  # Adam's moments came back: the same losses (printed to 6 digits)
        assert after[step] == pytest.approx(before[step], rel=1e-5), (step, before, after)


def test_gpt_trace_names_every_rank(first_run):
    root, proc = first_run
    trace = json.loads((root / "run1" / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert {e.get("pid") for e in events if e.get("ph") == "X"} >= {0, 1}
    assert "bubble measured" in proc.stdout and "vs simulated" in proc.stdout
    if importlib.util.find_spec("matplotlib"):  # the PNG needs the [viz] extra
        assert (root / "run1" / "trace.png").is_file()


def test_readme_zb_h1_bf16_zero1_job_trains(tmp_path):
    # README: python examples/train_gpt.py schedule=zb_h1 schedule.micro_batches=16 precision=bf16 zero.stage=1
    proc = run("train_gpt.py", "schedule=zb_h1", "schedule.micro_batches=16", "precision=bf16", "zero.stage=1",
               *TINY_GPT, "sample.length=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zb_h1 x 16 micro-batches, bfloat16" in proc.stdout
    losses = [float(row["loss"]) for row in metrics(tmp_path / "run")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert "validation loss" in proc.stdout and "master_weights" in proc.stdout  # fp32 masters of bf16 weights


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
