"""Checkpoints: exact resume, reload under other pipe degrees, and refusing bad files
(resuming at another layout with the optimizer state: test_reshard.py)."""

import os
import signal

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import WorkerError, run_local
from pipegrid.pipe import checkpoint as ckpt
from pipegrid.pipe.checkpoint import engine_state
from tests.support.engine_cases import N_LAYER, config, global_batches, loaded_outputs
from tests.support.models import TinyGPT, gpt_batches

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2}


def _train(cfg, until):
    """Train until global step ``until`` (resuming from checkpoint.dir if it holds one)."""
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    start, losses = engine.global_steps, []
    for step in range(start, until):  # the data position comes back with global_steps
        losses.append(engine.train_batch(iter(global_batches(step, topo.data, m)[d * m:(d + 1) * m])))
    return start, losses


@pytest.mark.parametrize("pipe,data,zero", [(2, 1, 0), (2, 2, 1)])
def test_resume_continues_the_same_loss_curve(tmp_path, pipe, data, zero):
    base = config("1f1b", pipe, data, 2, optimizer=ADAM, zero={"stage": zero})
    _, straight = run_local(_train, pipe * data, (base, 5), timeout_s=60)[0]
    cfg = {**base, "checkpoint": {"dir": str(tmp_path), "interval": 3}}
    first = run_local(_train, pipe * data, (cfg, 4), timeout_s=60)[0]  # saves at step 3, runs one more
    resumed = run_local(_train, pipe * data, (cfg, 5), timeout_s=60)[0]
    assert first == (0, straight[:4])
    assert resumed == (3, straight[3:])  # restarted from step 3: identical, not merely close
    assert open(tmp_path / "latest").read() == "step_00000003"


def _save_after_two_steps(cfg, directory):
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    for step in range(2):
        engine.train_batch(iter(global_batches(step, 1, 2)))
    engine.save_checkpoint(directory)
    _, outputs = engine.eval_batch(iter(gpt_batches(2, seed=7)), return_outputs=True)
    return outputs


def _outputs_with_and_without_optimizer(cfg, directory):
    return [loaded_outputs(cfg, directory, load) for load in (True, False)]


def test_checkpoint_loads_under_other_pipe_degrees(tmp_path):
    saved = run_local(_save_after_two_steps, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)[-1]
    assert len(saved) == 2
    for pipe in (1, 4):
        loaded = run_local(_outputs_with_and_without_optimizer, pipe, (config("1f1b", pipe, 1, 2), str(tmp_path)),
                           timeout_s=60)[-1]  # the last stage holds the outputs
        for step, outputs in loaded:
            assert step == 2 and len(outputs) == len(saved)
            for got, want in zip(outputs, saved):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path):
    run_local(_save_after_two_steps, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)
    step_dir = tmp_path / "step_00000002"
    layer = step_dir / ckpt.layer_file(3, 0)
    good = layer.read_bytes()
    layer.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(WorkerError, match=r"cannot load checkpoint file .*layer_00003-tp00.pt"):
        run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)
    torch.save({"weight": torch.zeros(1), "evil": _Pickled()}, layer)  # not weights-only
    with pytest.raises(WorkerError, match=r"layer_00003-tp00.pt: UnpicklingError"):
        run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)
    layer.write_bytes(good)
    shard = step_dir / ckpt.optim_shard_file(1, 0, 0)  # the optimizer state, memory-mapped at load
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(WorkerError, match=r"cannot load checkpoint file .*optim_shard-pp001-dp000-tp00.pt"):
        run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)


class _Pickled:
    """Any object that is not a tensor or a plain container."""


def _other_model(directory):
    engine = pg.initialize(TinyGPT(N_LAYER + 1, topology=pg.Topology(pipe=2)), config("1f1b", 2, 1, 2))
    engine.load_checkpoint(directory)


def test_a_checkpoint_of_another_model_lists_the_layers(tmp_path):
    run_local(_save_after_two_steps, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)
    with pytest.raises(WorkerError, match=r"different model: layers missing or different here \['5:Block'"):
        run_local(_other_model, 2, (str(tmp_path),), timeout_s=60)


def _killed_mid_save(cfg, directory):
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    engine.train_batch(iter(global_batches(0, 1, 2)))
    engine.save_checkpoint(directory)  # step 1: whole
    engine.train_batch(iter(global_batches(1, 1, 2)))
    if dist.get_rank() == 1:
        original = engine_state.save_file

        def dying_save(obj, path):
            original(obj, path)
            os.kill(os.getpid(), signal.SIGKILL)  # dies after writing one file of step 2
        engine_state.save_file = dying_save  # what the engine's save calls (local to this fork)
    engine.save_checkpoint(directory)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    cfg = config("1f1b", 2, 1, 2, comm={"timeout_s": 10})
    with pytest.raises(WorkerError, match="rank 1 was killed by signal 9"):
        run_local(_killed_mid_save, 2, (cfg, str(tmp_path)), timeout_s=60)
    assert open(tmp_path / "latest").read() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    step, _ = run_local(loaded_outputs, 2, (config("1f1b", 2, 1, 2), str(tmp_path)), timeout_s=60)[0]
    assert step == 1


def test_unwritable_checkpoint_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.dir .*file/ckpt' is not writable"):
        ckpt.check_writable(str(blocker / "ckpt"))
