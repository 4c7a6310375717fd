"""A host with fewer GPUs than local ranks (one GPU faked through torch's NVML count): the
launcher never initialises CUDA before it forks, its CPU workers see no GPU and train to the
end over gloo, and a fork after CUDA was initialised is refused or avoided, never a crash."""

from __future__ import annotations

import os

import pytest
import torch

import pipegrid as pg
from pipegrid.launch import launch, run_local, start_method_for
from tests.support.models import mlp_batches, mlp_layers, mse_loss

_CALLS: list[str] = []  # CUDA-initialising calls made in this process (a forked worker has its own copy)


def _initialising(name: str):
    def call(*args, **kwargs):
        _CALLS.append(name)
        raise RuntimeError(f"CUDA error: initialization error ({name} after fork)")
    return call


@pytest.fixture
def one_gpu(monkeypatch):
    """One GPU as torch.cuda.device_count() reports it through NVML, without initialising CUDA
    (none once CUDA_VISIBLE_DEVICES=""); every call that would initialise CUDA is recorded and
    fails, as it would in a worker forked after one."""
    _CALLS.clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else 1)
    for name in ("is_available", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, _initialising(f"torch.cuda.{name}"))
    if hasattr(torch._C, "_cuda_getDeviceCount"):  # a CUDA build (its absence is how torch tells a CPU build)
        monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", _initialising("cudaGetDeviceCount"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # no re-exec of the test process


def _train_two_steps(backend: str) -> dict:
    module = pg.PipelineModule(mlp_layers(depth=2), loss_fn=mse_loss, topology=pg.Topology(pipe=2), seed=7)
    engine = pg.initialize(module, {"comm": {"backend": backend, "timeout_s": 60},
                                    "schedule": {"name": "1f1b", "micro_batches": 2},
                                    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-2}})
    losses = [engine.train_batch(iter(mlp_batches(2, seed=step))) for step in range(2)]
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": torch.cuda.device_count(),
            "device": engine.device.type, "losses": losses, "calls": list(_CALLS)}


def test_the_readme_command_on_one_gpu_trains_on_the_cpu_without_touching_cuda(one_gpu, capfd):
    ran = launch(_train_two_steps, "auto", world_size=2)
    assert _CALLS == []  # the launcher counted GPUs through NVML and forked an untouched process
    assert ran["visible"] == "" and ran["gpus"] == 0 and ran["device"] == "cpu"  # rank 0: no GPU to touch
    assert ran["calls"] == []
    assert "2 ranks on this host but 1 visible GPU(s)" in capfd.readouterr().err
    reference = launch(_train_two_steps, "gloo", world_size=2)
    assert ran["losses"] == reference["losses"]


def _environment_and_count() -> tuple[str | None, int]:
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()


def test_every_forked_worker_sees_no_gpu(one_gpu):
    assert run_local(_environment_and_count, 2, backend=None) == [("", 0), ("", 0)]
    assert _CALLS == []


def test_a_fork_after_cuda_was_initialised_is_refused_naming_the_fix(one_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is already initialised.*start_method='spawn'"):
        run_local(_environment_and_count, 2, backend=None)
    assert start_method_for(on_gpus=False) == "spawn"  # launch() spawns its CPU workers instead


def test_the_launcher_forks_cpu_workers_and_spawns_gpu_ones(one_gpu):
    assert start_method_for(on_gpus=False) == "fork"
    assert start_method_for(on_gpus=True) == "spawn"


def test_a_spawned_cpu_worker_is_born_without_a_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert run_local(_environment_and_count, 1, backend=None, start_method="spawn", cpu_only=True) == [("", 0)]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the launcher's own environment is left as it was
