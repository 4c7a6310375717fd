"""Save and stop on a signal (issue 15, section 3) on a pipe x data grid: one rank's signal
makes every rank save the step in flight (they agree through the end-of-step flag), a
second signal during the save leaves it whole, the resumed run continues the one-process
reference's loss curve, and inside submitit its requeue handler runs after the save; in a
bare process without checkpoint.dir a signal ends it at once, saying so. Whole jobs under
the local launcher and torchrun: tests/dist/test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import run_local
from pipegrid.pipe import checkpoint as ckpt
from pipegrid.pipe.preemption import Preempted
from tests.support.engine_cases import N_LAYER, config, global_batches, run_reference
from tests.support.models import TinyGPT

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _cfg(directory: str) -> dict:
    return config("1f1b", 2, 2, 2, checkpoint={"dir": directory})


def _train(directory: str, signal_at: int = -1, again_in_save: bool = False) -> list[float]:
    """Steps up to STEPS from where ``directory`` left off; rank 3 signals itself during step
    ``signal_at`` + 1, rank 0 once more while it writes the checkpoint."""
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2, data=2)), _cfg(directory))
    rank, data_rank = dist.get_rank(), engine.groups.coord.data
    if again_in_save and rank == 0:
        save = torch.save

        def save_and_signal(*args, **kwargs):  # (a forked worker: patching torch is local to it)
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM while the checkpoint is written
            return save(*args, **kwargs)
        torch.save = save_and_signal
    losses = []
    for step in range(engine.global_steps, STEPS):
        if step == signal_at and rank == 3:  # a data-parallel peer on the last stage: no one else got it
            os.kill(os.getpid(), signal.SIGTERM)
        losses.append(engine.train_batch(iter(global_batches(step, 2, 2)[data_rank * 2:(data_rank + 1) * 2])))
    return losses


def test_one_rank_s_signal_saves_the_step_in_flight_on_every_rank_and_the_run_resumes(tmp_path):
    with pytest.raises(Preempted) as info:
        run_local(_train, 4, (str(tmp_path), 1, True), backend=None, timeout_s=120)
    stop = info.value
    assert (stop.code, stop.signal_name, stop.step) == (0, "SIGTERM", 2)  # step 2 was in flight
    assert stop.checkpoint == str(tmp_path / "step_00000002")
    assert ckpt.whole_checkpoints(str(tmp_path)) == ["step_00000002"]  # whole despite the second signal
    resumed = run_local(_train, 4, (str(tmp_path),), backend=None, timeout_s=120)
    reference = run_reference(_cfg(str(tmp_path)), steps=STEPS)["losses"]
    assert stop.loss == pytest.approx(reference[1], rel=1e-5)  # the loss train_batch could not return
    for rank, losses in enumerate(resumed):  # steps 3 and 4 continue the uninterrupted curve
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[2:]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"rank {rank}: {m}")


def _submitit_job(directory: str, out: str) -> None:
    """A submitit task: its SIGUSR2 handler (the requeue) is in place before pipegrid's."""
    os.environ["SUBMITIT_EXECUTOR"] = "slurm"

    def requeue(number, frame):
        with open(os.path.join(out, f"requeue-{dist.get_rank()}"), "w") as f:
            f.write(open(os.path.join(directory, ckpt.LATEST)).read())  # the checkpoint is already there
    signal.signal(signal.SIGUSR2, requeue)
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2)),
                           config("1f1b", 2, 1, 2, checkpoint={"dir": directory}))
    for step in range(3):
        if step == 1 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's --signal=USR2@..., as submitit asks for it
        engine.train_batch(iter(global_batches(step, 1, 2)))


def test_inside_submitit_its_requeue_handler_runs_after_the_save(tmp_path):
    directory, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    with pytest.raises(Preempted, match="SIGUSR2: saved step 2"):
        run_local(_submitit_job, 2, (str(directory), str(out)), backend=None, timeout_s=60)
    for rank in range(2):
        assert (out / f"requeue-{rank}").read_text() == "step_00000002"


def _caught(directory: str) -> list[int]:
    """A caller that catches Preempted and trains on: the signal is not acted on twice."""
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2)),
                           config("1f1b", 2, 1, 2, checkpoint={"dir": directory}))
    stops = []
    for step in range(4):
        if step == 1 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        try:
            engine.train_batch(iter(global_batches(step, 1, 2)))
        except Preempted as stop:
            stops.append(stop.step)
    return stops + [engine.global_steps]


def test_a_caught_preemption_is_not_raised_again(tmp_path):
    assert run_local(_caught, 2, (str(tmp_path),), backend=None, timeout_s=60) == [[2, 4], [2, 4]]


# --- one bare process (no engine, no launcher) ---------------------------------------------

NO_CHECKPOINT_DIR = textwrap.dedent('''
    import os, signal, time
    from pipegrid.pipe.preemption import SignalWatch

    SignalWatch(["SIGTERM"], saves=False, rank=0).arm()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running")
''')


def test_without_a_checkpoint_dir_a_signal_ends_the_process_at_once_saying_so():
    proc = subprocess.run([sys.executable, "-c", NO_CHECKPOINT_DIR], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGTERM  # ended by the signal, as without pipegrid
    assert "still running" not in proc.stdout
    assert proc.stderr == ("pipegrid: SIGTERM received; checkpoint.dir is not set, so nothing was saved; "
                           "exiting\n")
