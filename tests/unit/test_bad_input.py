"""Bad input fails early with an error that names the fix (no process group needed).

Distributed cases live beside the feature they guard: a short data iterator and a
changed activation shape in tests/dist/test_engine_features.py, bad checkpoints in
tests/dist/test_checkpoint.py, non-finite losses in tests/dist/test_engine_features.py.
"""


import pytest
import torch.distributed as dist

import pipegrid as pg
from pipegrid.conf.schema import to_train_config
from pipegrid.topology.join import _join_process_group
from pipegrid.schedules import ScheduleError, build
from pipegrid.topology.groups import check_world_size
from tests.support.models import TinyGPT, gpt_layers


def test_world_size_must_match_the_grid():
    with pytest.raises(ValueError, match=r"needs 8 processes .* got WORLD_SIZE=4; change topology"):
        check_world_size(pg.Topology(pipe=2, data=2, tensor=2), 4)


def test_multi_process_topology_without_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="start the job with torchrun"):
        _join_process_group(to_train_config({"topology": {"pipe": 2}}))
    assert not dist.is_initialized()


def test_fewer_layers_than_stages():
    with pytest.raises(ValueError, match=r"8 layers.*9|9.*8 layers"):
        pg.PipelineModule(gpt_layers(3), pipe=9, pipe_rank=0)


def test_unknown_schedule_and_partition_method():
    with pytest.raises(ValueError, match="schedule.name must be one of"):
        to_train_config({"schedule": {"name": "pipedream"}})
    with pytest.raises(ScheduleError):
        build("pipedream", 2, 4)
    with pytest.raises(ValueError, match="partition"):
        pg.PipelineModule(gpt_layers(3), pipe=2, pipe_rank=0, partition_method="bogus")


@pytest.mark.parametrize("micro_batches", [0, -1])
def test_micro_batches_below_one(micro_batches):
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        to_train_config({"schedule": {"micro_batches": micro_batches}})


def _config(**schedule):
    return {"topology": {"pipe": 2}, "schedule": schedule}


def test_schedule_refusing_the_micro_batches_fails_before_any_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = TinyGPT(3, topology=pg.Topology(pipe=2), virtual_stages=2)
    with pytest.raises(ScheduleError, match="micro"):
        pg.initialize(model, _config(name="interleaved_1f1b", micro_batches=3, virtual_stages=2))
    assert not dist.is_initialized()


def test_missing_loss_fn_fails_before_any_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = pg.PipelineModule(gpt_layers(3), topology=pg.Topology(pipe=2))
    with pytest.raises(ValueError, match="no loss_fn.*pass loss_fn="):
        pg.initialize(model, _config(name="1f1b", micro_batches=2))
    assert not dist.is_initialized()


def test_module_cut_for_another_layout(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = TinyGPT(3, pipe=2)
    with pytest.raises(ValueError, match=r"module \(cut into pipe=2\) has pipe=2 but the config sets "
                                         r"topology.pipe=4"):
        pg.initialize(model, {"topology": {"pipe": 4}, "schedule": {"micro_batches": 4}})
    with pytest.raises(ValueError, match=r"cut into virtual_stages=1 chunks .* config sets schedule.virtual_stages=2"):
        pg.initialize(model, _config(name="interleaved_1f1b", micro_batches=4, virtual_stages=2))
    assert not dist.is_initialized()


def test_unknown_config_keys_and_types():
    # an unknown nested key, or a value of the wrong type, is pipegrid's ValueError naming the full
    # key, the section's keys and the closest one (not OmegaConf's own error)
    with pytest.raises(ValueError, match=r"unknown config key topology.pipee; the keys of topology are "
                                         r"\['data', 'pipe', 'tensor'\]; did you mean topology.pipe\?"):
        to_train_config({"topology": {"pipee": 2}})
    with pytest.raises(ValueError, match=r"config key zero.stage: Value 'two'"):
        to_train_config({"zero": {"stage": "two"}})
    with pytest.raises(ValueError, match="unknown config keys"):
        to_train_config({"topologyy": {}})
    with pytest.raises(ValueError, match="optimizer needs a _target_"):
        to_train_config({"optimizer": {"lr": 1.0}})
    with pytest.raises(ValueError, match="train.on_nonfinite must be"):
        to_train_config({"train": {"on_nonfinite": "ignore"}})


def test_kernels_backend_is_checked_in_the_schema():
    from pipegrid.conf.schema import KERNEL_BACKENDS
    from pipegrid.kernels.backend import BACKENDS

    assert tuple(KERNEL_BACKENDS) == tuple(BACKENDS)  # the schema's copy cannot drift
    with pytest.raises(ValueError, match=r"kernels.backend must be one of auto, torch, cupy, got 'cuda'"):
        to_train_config({"kernels": {"backend": "cuda"}})


@pytest.mark.parametrize("values,match", [
    ({"initial_loss_scale": 0.0}, r"initial_loss_scale and precision.min_loss_scale must be > 0"),
    ({"min_loss_scale": 1e6}, r"min_loss_scale=1000000.0 is above precision.initial_loss_scale"),
    ({"backoff_factor": 2.0}, r"backoff_factor must be in \(0, 1\)"),
    ({"growth_interval": 0}, r"growth_interval must be an integer >= 1, got 0"),
    ({"hysteresis": 0}, r"hysteresis must be an integer >= 1, got 0"),
])
def test_loss_scaler_values_fail_before_any_process_group(values, match):
    with pytest.raises(ValueError, match=match):  # with the dict, before a module or a group is made
        to_train_config({"precision": {"dtype": "float16", **values}})
    with pytest.raises(ValueError, match=match):  # whatever the dtype
        to_train_config({"precision": {"dtype": "float32", **values}})
    assert not dist.is_initialized()
