"""The grid is said once (issue 15, section 1): ``initialize(module, config)`` takes
``topology`` and ``schedule.virtual_stages`` from the module (and the groups) where the
config leaves them out, for a dict, a DictConfig and a TrainConfig alike, and refuses
only a config that sets another value, naming both. No process group is needed here;
tests/dist/test_engine_features.py trains with such configs against the reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

import pipegrid as pg
from pipegrid.conf.schema import ScheduleConfig, TopologyConfig, TrainConfig, to_train_config
from pipegrid.pipe.module_grid import config_with_module_grid
from tests.support.models import TinyGPT

KINDS = ("dict", "DictConfig", "TrainConfig")


def _config(kind: str, topology: dict | None = None, **schedule) -> object:
    """The same settings as ``kind``; sections and keys not given are left out."""
    tree = {"schedule": {"name": "interleaved_1f1b", "micro_batches": 4, **schedule}}
    if topology is not None:
        tree["topology"] = topology
    if kind == "dict":
        return tree
    if kind == "DictConfig":
        return OmegaConf.create(tree)
    return TrainConfig(topology=TopologyConfig(**(topology or {})), schedule=ScheduleConfig(**tree["schedule"]))


def _resolved(kind: str, model, groups=None, topology: dict | None = None, **schedule) -> TrainConfig:
    return config_with_module_grid(to_train_config(_config(kind, topology, **schedule)), model, groups)


@pytest.fixture(scope="module")
def model():
    """Pipe 2 x data 2, two chunks per pipe rank (built as rank 0 would)."""
    return TinyGPT(3, topology=pg.Topology(pipe=2, data=2), virtual_stages=2, pipe_rank=0)


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_config_leaves_out_comes_from_the_module(kind, model):
    cfg = _resolved(kind, model)
    assert (cfg.topology.pipe, cfg.topology.data, cfg.topology.tensor) == (2, 2, 1)
    assert cfg.schedule.virtual_stages == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_may_repeat_the_module_s_values(kind, model):
    cfg = _resolved(kind, model, topology={"pipe": 2, "data": 2, "tensor": 1}, virtual_stages=2)
    assert (cfg.topology.pipe, cfg.topology.data, cfg.schedule.virtual_stages) == (2, 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_that_sets_another_value_is_refused_naming_both(kind, model):
    with pytest.raises(ValueError, match=r"Topology\(pipe=2, data=2, tensor=1\) has pipe=2 but the config "
                                         r"sets topology.pipe=4; leave topology.pipe out of the config"):
        _resolved(kind, model, topology={"pipe": 4})
    with pytest.raises(ValueError, match=r"has data=2 but the config sets topology.data=1"):
        _resolved(kind, model, topology={"data": 1})  # 1 is the old default: set, so it counts
    with pytest.raises(ValueError, match=r"cut into virtual_stages=2 .* config sets schedule.virtual_stages=1"):
        _resolved(kind, model, virtual_stages=1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_module_cut_by_pipe_alone_gives_only_pipe(kind):
    model = TinyGPT(3, pipe=2, pipe_rank=1)
    cfg = _resolved(kind, model, topology={"data": 3}, name="1f1b")
    assert (cfg.topology.pipe, cfg.topology.data, cfg.topology.tensor) == (2, 3, 1)
    cfg = _resolved(kind, model, name="1f1b")
    assert (cfg.topology.pipe, cfg.topology.data, cfg.schedule.virtual_stages) == (2, 1, 1)


def test_the_groups_give_the_grid_too_and_must_agree_with_the_module():
    groups = SimpleNamespace(topology=pg.Topology(pipe=2, data=2))  # all config_with_module_grid reads of them
    cfg = _resolved("dict", TinyGPT(3, pipe=2, pipe_rank=0), groups, name="1f1b")
    assert (cfg.topology.pipe, cfg.topology.data) == (2, 2)
    with pytest.raises(ValueError, match=r"module's Topology\(pipe=2, data=1, tensor=1\) has data=1 but the "
                                         r"groups were built for Topology\(pipe=2, data=2, tensor=1\)"):
        _resolved("dict", TinyGPT(3, topology=pg.Topology(pipe=2), pipe_rank=0), groups, name="1f1b")
    with pytest.raises(ValueError, match=r"groups' Topology\(pipe=2, data=2, tensor=1\) has data=2 but the "
                                         r"config sets topology.data=1"):
        _resolved("dict", TinyGPT(3, pipe=2, pipe_rank=0), groups, topology={"data": 1}, name="1f1b")


def test_chunks_from_the_module_need_the_interleaved_schedule(model):
    with pytest.raises(ValueError, match=r"virtual_stages=2 chunks per pipe rank, which only schedule.name="
                                         r"interleaved_1f1b runs, got '1f1b'"):
        _resolved("dict", model, name="1f1b")


def test_a_field_assigned_after_construction_counts_as_set(model):
    cfg = to_train_config({})
    assert not cfg.is_set("topology.pipe") and cfg.topology.pipe == 1  # reads 1 until resolved
    cfg.topology.pipe = 3
    with pytest.raises(ValueError, match="config sets topology.pipe=3"):
        config_with_module_grid(cfg, model)


def test_a_hydra_app_composes_its_grid_and_may_leave_it_to_the_module():
    from pipegrid.conf.apps import GPTAppConfig
    from pipegrid.conf.checks import to_app_config

    app = to_app_config({"topology": {"pipe": 2, "data": 1, "tensor": 1}}, GPTAppConfig)
    assert all(app.is_set(f"topology.{axis}") for axis in ("pipe", "data", "tensor"))
    app = to_app_config(OmegaConf.create({"topology": {"pipe": None}}), GPTAppConfig)  # topology.pipe=null
    assert not app.is_set("topology.pipe") and app.topology.pipe == 1


def test_refused_before_any_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    model = TinyGPT(3, topology=pg.Topology(pipe=2))
    with pytest.raises(ValueError, match=r"has pipe=2 but the config sets topology.pipe=4"):
        pg.initialize(model, {"topology": {"pipe": 4}, "schedule": {"micro_batches": 4}})
    assert not dist.is_initialized()
