"""The DeepSpeed adapter's parts against DeepSpeed's own: LR schedules step for step, the fp16
loss-scale rule, the 'parameters' cut, topologies and the batch trio (DeepSpeed's answers come
from tests/support/deepspeed_values.py in a subprocess; skipped, saying why, without DeepSpeed).
Plus what needs no DeepSpeed: specs, seeds, the loader, checkpointable scheduler state."""

from __future__ import annotations

import inspect
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipegrid.compat.deepspeed import pipe, utils
from pipegrid.compat.deepspeed.config_keys import DS_SCHEDULES, scheduler_spec
from pipegrid.compat.deepspeed.from_config import batch_sizes
from pipegrid.compat.deepspeed.runtime import lr_schedules
from pipegrid.compat.deepspeed.runtime.loss_scaler import DeepSpeedLossScaler
from pipegrid.compat.deepspeed.runtime.utils import set_random_seed
from tests.support.deepspeed_values import MARK

REPO = Path(__file__).resolve().parents[2]

SCHEDULES = [
    {"type": "WarmupLR", "params": {}, "optimizer": "SGD", "lr": 0.1, "steps": 6},
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.2, "warmup_num_steps": 4,
                                    "warmup_type": "linear"}, "optimizer": "SGD", "lr": 0.1, "steps": 7},
    {"type": "WarmupLR", "params": {"warmup_num_steps": 1, "warmup_type": "cubic"}, "optimizer": "SGD", "lr": 0.1,
     "steps": 3},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 8, "warmup_num_steps": 3}, "optimizer": "Adam", "lr": 0.1,
     "steps": 10},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 6, "warmup_num_steps": 3, "warmup_type": "linear",
                                         "warmup_min_lr": 0.001, "warmup_max_lr": 0.01}, "optimizer": "SGD",
     "lr": 0.1, "steps": 8},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "warmup_num_steps": 3}, "optimizer": "Adam",
     "lr": 0.05, "steps": 11},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 5, "warmup_num_steps": 2, "warmup_min_ratio": 0.1,
                                          "cos_min_ratio": 0.2, "warmup_type": "linear"}, "optimizer": "SGD",
     "lr": 0.05, "steps": 7},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 3},
     "optimizer": "Adam", "lr": 0.1, "steps": 9},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 4,
                                    "cycle_second_step_size": 2, "cycle_first_stair_count": 2, "decay_step_size": 2,
                                    "decay_lr_rate": 0.5, "decay_mom_rate": 0.1, "cycle_min_mom": 0.85,
                                    "cycle_max_mom": 0.95}, "optimizer": "Adam", "lr": 0.1, "steps": 12},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.02, "cycle_max_lr": 0.2, "cycle_first_step_size": 2},
     "optimizer": "SGD", "lr": 0.1, "steps": 6},  # no betas: momentum cycling switches itself off
    {"type": "LRRangeTest", "params": {}, "optimizer": "SGD", "lr": 0.1, "steps": 4},
    {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 2,
                                       "lr_range_test_step_rate": 3.0, "lr_range_test_staircase": True},
     "optimizer": "Adam", "lr": 0.1, "steps": 7},
]
DYNAMIC = {"init_scale": 2.0 ** 4, "scale_window": 3, "min_scale": 1.0, "delayed_shift": 2,
           "consecutive_hysteresis": False, "raise_error_at_min_scale": True}
OVERFLOWS = [False, False, False, True, False, True, True, True, False, False, False, False, False, False, False,
             True, True, True, True, True, True, True]
SCALERS = [
    {"kind": "dynamic", "args": DYNAMIC, "overflows": OVERFLOWS},
    {"kind": "dynamic", "args": {**DYNAMIC, "consecutive_hysteresis": True, "delayed_shift": 3},
     "overflows": OVERFLOWS},
    {"kind": "dynamic", "args": {**DYNAMIC, "delayed_shift": 1, "scale_window": 2}, "overflows": OVERFLOWS},
    {"kind": "fp16_optimizer", "args": {**DYNAMIC, "dynamic": True, "scale_window": 2}, "overflows": OVERFLOWS},
    {"kind": "fp16_optimizer", "args": {**DYNAMIC, "dynamic": False, "init_scale": 64.0}, "overflows": OVERFLOWS[:8]},
]
_rng = random.Random(3)
PARTITIONS = [{"weights": [_rng.choice([0, 0, 1, 5, 100, 4096, 4097]) for _ in range(n)], "parts": m}
              for n, m in [(2, 2), (5, 2), (8, 2), (9, 3), (13, 4), (20, 3), (30, 5)] for _ in range(3)]
PARTITIONS.append({"weights": [0, 1, 1, 0, 1, 1, 0, 1], "parts": 2})  # type:REGEX weights, ties
TOPOLOGIES = [{"cls": "PipeDataParallelTopology", "args": [2, 3]},
              {"cls": "PipeModelDataParallelTopology", "args": [2, 2, 2]}]
BATCHES = [{"config": c, "data": d} for c, d in [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2), ({"train_batch_size": 32}, 4),
    ({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 2), ({"train_micro_batch_size_per_gpu": 4}, 3),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 5}, 2),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}, 2),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2)]]


@pytest.fixture(scope="module")
def deepspeed_says() -> dict:
    requests = {"schedules": SCHEDULES, "scalers": SCALERS, "partitions": PARTITIONS, "topologies": TOPOLOGIES,
                "batches": BATCHES, "signatures": True}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "tests.support.deepspeed_values"], input=json.dumps(requests),
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    if done.returncode != 0 and ("No module named 'deepspeed'" in done.stderr or "ImportError" in done.stderr):
        pytest.skip(f"DeepSpeed cannot be imported: {done.stderr.strip().splitlines()[-1]} (CI installs "
                    "deepspeed==0.19.*)")
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith(MARK))
    return json.loads(line[len(MARK):])


def _optimizer(kind: str, lr: float) -> torch.optim.Optimizer:
    param = nn.Parameter(torch.zeros(2))
    param.grad = torch.zeros(2)
    return torch.optim.Adam([param], lr=lr) if kind == "Adam" else torch.optim.SGD([param], lr=lr, momentum=0.9)


def _record(optimizer: torch.optim.Optimizer) -> dict:
    group = optimizer.param_groups[0]
    return {"lr": float(group["lr"]), "betas": list(group["betas"]) if "betas" in group else None}


@pytest.mark.parametrize("index", range(len(SCHEDULES)), ids=[f"{s['type']}-{i}" for i, s in enumerate(SCHEDULES)])
def test_schedules_step_exactly_like_deepspeeds(deepspeed_says, index):
    request = SCHEDULES[index]
    optimizer = _optimizer(request["optimizer"], request["lr"])
    scheduler = getattr(lr_schedules, request["type"])(optimizer, **request["params"])
    ours = [_record(optimizer)]
    for _ in range(request["steps"]):
        optimizer.step()
        scheduler.step()
        ours.append(_record(optimizer))
    assert ours == deepspeed_says["schedules"][index]  # bit for bit: the same float operations


@pytest.mark.parametrize("index", range(len(SCALERS)))
def test_loss_scale_rule_matches_deepspeeds(deepspeed_says, index):
    request = SCALERS[index]
    args = dict(request["args"])
    if request["kind"] == "fp16_optimizer":  # what the translation passes for ZeRO-0
        args.update(delayed_shift=1, consecutive_hysteresis=False, raise_error_at_min_scale=False)
    scaler = DeepSpeedLossScaler(**args)
    ours = []
    for overflow in request["overflows"]:
        try:
            scaler.update(overflow)
        except FloatingPointError:
            ours.append("raise")
            break
        ours.append(scaler.scale)
    assert ours == deepspeed_says["scalers"][index]


def test_parameters_cut_matches_deepspeeds_partition_balanced(deepspeed_says):
    ours = [pipe.deepspeed_partition(r["weights"], r["parts"]) for r in PARTITIONS]
    assert ours == deepspeed_says["partitions"]


@pytest.mark.parametrize("index", range(len(TOPOLOGIES)))
def test_topologies_match_deepspeeds(deepspeed_says, index):
    topo = getattr(pipe, TOPOLOGIES[index]["cls"])(*TOPOLOGIES[index]["args"])
    world = topo.world_size()
    ours = {"comm_lists": {axis: topo.get_axis_comm_lists(axis) for axis in topo.get_axis_names()},
            "coords": [list(topo.get_coord(r)) for r in range(world)],
            "reprs": [topo.get_rank_repr(r) for r in range(world)],
            "pipe0": topo.filter_match(pipe=0), "axis_list": topo.get_axis_list("data", 0),
            "dims": {axis: topo.get_dim(axis) for axis in ("pipe", "data", "model", "bogus")}}
    assert ours == deepspeed_says["topologies"][index]
    grid = topo.to_topology()  # the same ranks on pipegrid's grid
    assert [tuple(grid.coord(r)) for r in range(world)] == \
        [tuple(c) + (0,) * (3 - len(c)) for c in ours["coords"]]


def test_batch_trio_matches_deepspeed_config(deepspeed_says):
    for request, theirs in zip(BATCHES, deepspeed_says["batches"]):
        if isinstance(theirs, dict):
            with pytest.raises(ValueError):
                batch_sizes(request["config"], request["data"])
        else:
            assert list(batch_sizes(request["config"], request["data"])) == theirs


# --- without DeepSpeed ------------------------------------------------------------------
def test_schedule_table_covers_every_schedule_and_its_parameters():
    """The table is read from the classes' signatures: every schedule class of the module is in it, with
    each argument (required when it has no default), and scheduler_spec checks a config against it."""
    classes = {name: cls for name, cls in vars(lr_schedules).items() if inspect.isclass(cls)
               and issubclass(cls, lr_schedules._DeepSpeedSchedule) and not name.startswith("_")}
    assert set(DS_SCHEDULES) == set(classes) == {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle",
                                                 "LRRangeTest"}
    assert DS_SCHEDULES["OneCycle"][0] == {"cycle_min_lr", "cycle_max_lr"}
    assert DS_SCHEDULES["WarmupDecayLR"][1] == {"total_num_steps", "warmup_min_lr", "warmup_max_lr",
                                                "warmup_num_steps", "warmup_type"}
    for name, cls in classes.items():
        required, accepted = DS_SCHEDULES[name]
        params = inspect.signature(cls).parameters
        assert accepted == set(params) - {"optimizer", "last_batch_iteration"}, name
        assert required == {p for p in accepted if params[p].default is inspect.Parameter.empty}, name
        problems: list[str] = []
        spec = scheduler_spec({"type": name, "params": {p: 1 for p in accepted}}, problems)
        assert not problems and spec["_target_"] == f"{lr_schedules.__name__}.{name}", (name, problems)
        scheduler_spec({"type": name, "params": {"bogus": 1}}, problems)
        assert problems == [(f"scheduler {name}: params missing {sorted(required)}, unknown ['bogus'] (it takes "
                             f"{sorted(accepted)}); DeepSpeed fails on these too")], name


def test_package_names_load_on_first_use():
    from pipegrid.compat import deepspeed

    assert set(deepspeed.__all__) == set(deepspeed._EXPORTS) | set(deepspeed._SUBMODULES)
    for name in deepspeed.__all__:
        assert getattr(deepspeed, name) is not None, name
    assert deepspeed.initialize.__module__ == "pipegrid.compat.deepspeed.entry"
    with pytest.raises(AttributeError, match="has no attribute 'zero'"):
        deepspeed.zero  # noqa: B018 - DeepSpeed's ZeRO module has no counterpart


def test_schedule_table_matches_deepspeeds_classes(deepspeed_says):
    """DeepSpeed's own schedules (VALID_LR_SCHEDULES) take the same arguments, required the same way."""
    theirs = {name: ({p for p, required in params.items() if required}, set(params))
              for name, params in deepspeed_says["signatures"].items()}
    assert DS_SCHEDULES == theirs


@pytest.mark.parametrize("name,params", [("WarmupLR", {"warmup_num_steps": 4}),
                                         ("WarmupDecayLR", {"total_num_steps": 8}),
                                         ("WarmupCosineLR", {"total_num_steps": 8, "warmup_num_steps": 2}),
                                         ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}),
                                         ("LRRangeTest", {})])
def test_schedule_state_survives_a_weights_only_checkpoint(name, params):
    first = getattr(lr_schedules, name)(_optimizer("Adam", 0.1), **params)
    for _ in range(3):
        first.optimizer.step()
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = getattr(lr_schedules, name)(_optimizer("Adam", 0.1), **params)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for scheduler in (first, second):
        scheduler.optimizer.step()
        scheduler.step()
    assert first.get_last_lr() == second.get_last_lr() and first.last_batch_iteration == 3


def test_schedules_refuse_a_resume_position_and_bad_steps():
    with pytest.raises(ValueError, match="engine.load_checkpoint"):
        lr_schedules.WarmupLR(_optimizer("SGD", 0.1), last_batch_iteration=4)
    with pytest.raises(ValueError, match="warmup_num_steps must be a positive integer"):
        lr_schedules.WarmupLR(_optimizer("SGD", 0.1), warmup_num_steps=0)


def test_loss_scaler_state_round_trip_and_checks():
    scaler = DeepSpeedLossScaler(init_scale=8.0, scale_window=2, delayed_shift=2)
    for overflow in (False, True, False, False, False):
        scaler.update(overflow)
    twin = DeepSpeedLossScaler(init_scale=8.0, scale_window=2, delayed_shift=2)
    twin.load_state_dict(scaler.state_dict())
    assert twin.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="scale_window >= 1"):
        DeepSpeedLossScaler(scale_window=0)


def test_specs_keep_deepspeeds_signatures():
    spec = pipe.LayerSpec(nn.Linear, 4, 2, bias=False)
    assert (spec.typename, spec.module_args, spec.module_kwargs) == (nn.Linear, (4, 2), {"bias": False})
    assert spec.build(log=True).bias is None
    tied = pipe.TiedLayerSpec("embed", nn.Embedding, 10, 4, forward_fn=None)
    assert tied.tied_weight_attr == ["weight"] and tied.key == "embed"
    with pytest.raises(TypeError, match="only supports torch.nn.Module types"):
        pipe.LayerSpec(lambda: nn.Linear(2, 2))


def test_topologies_pipegrid_cannot_lay_out_are_refused():
    assert pipe.PipeModelDataParallelTopology(2, 1, 3).to_topology() == \
        __import__("pipegrid").Topology(pipe=2, data=3, tensor=1)
    with pytest.raises(ValueError, match="pipe-major"):
        pipe.ProcessTopology(["data", "pipe"], [2, 2]).to_topology()
    with pytest.raises(ValueError, match="axes pipe, data and model"):
        pipe.ProcessTopology(["pipe", "expert"], [2, 2]).to_topology()
    with pytest.raises(ValueError, match="does not support slices"):
        pipe.PipeDataParallelTopology(2, 2).get_rank(pipe=1)


def test_set_random_seed_seeds_python_numpy_and_torch():
    set_random_seed(np.int64(7))  # DeepSpeed's partitioner hands out numpy integers
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())


def test_repeating_loader_starts_over():
    loader = utils.RepeatingLoader([1, 2, 3])
    assert [next(loader) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
