"""GPT example jobs from the README and docs/checkpoints.md, run as a user runs them (subprocesses,
tiny model): the zero-bubble bf16 ZeRO-1 job, and a run saved at pipe=2 that resumes at pipe=4 with
its optimizer state and continues the run that never stopped."""

from __future__ import annotations

import math

import pytest

from tests.dist.test_examples import TINY_GPT, metrics, run


def test_readme_zb_h1_bf16_zero1_job_trains(tmp_path):
    # README: python examples/train_gpt.py schedule=zb_h1 schedule.micro_batches=16 precision=bf16 zero.stage=1
    proc = run("train_gpt.py", "schedule=zb_h1", "schedule.micro_batches=16", "precision=bf16", "zero.stage=1",
               *TINY_GPT, "sample.length=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zb_h1 x 16 micro-batches, bfloat16" in proc.stdout
    losses = [float(row["loss"]) for row in metrics(tmp_path / "run")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert "validation loss" in proc.stdout and "master_weights" in proc.stdout  # fp32 masters of bf16 weights


@pytest.mark.slow
def test_gpt_saved_at_pipe_2_resumes_at_pipe_4(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = (*TINY_GPT, "sample.length=0", "eval.interval=0", f"checkpoint.dir={ckpt}")
    straight = run("train_gpt.py", *common, "topology=pipe2", "checkpoint.interval=2",
                   f"hydra.run.dir={tmp_path / 'pipe2'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # go back to the checkpoint of step 2, as if the job had been stopped there
    (ckpt / "latest").write_text("step_00000002")
    for step_dir in ckpt.glob("step_00000004"):
        for file in step_dir.iterdir():
            file.unlink()
        step_dir.rmdir()
    resumed = run("train_gpt.py", *common, "topology=pipe4", f"hydra.run.dir={tmp_path / 'pipe4'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    before = {int(r["step"]): float(r["loss"]) for r in metrics(tmp_path / "pipe2")}
    after = {int(r["step"]): float(r["loss"]) for r in metrics(tmp_path / "pipe4")}
    assert sorted(after) == [3, 4]
    for step, loss in after.items():  # Adam's moments came back: the same losses (printed to 6 digits)
        assert loss == pytest.approx(before[step], rel=1e-5), (step, before, after)
