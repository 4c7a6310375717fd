"""pipegrid.hf at tensor=2 built from the topology alone (no tensor_group: the model joins
torch.distributed from the environment and builds pipegrid's groups, which pg.initialize reuses):

- a run saved with engine.save_checkpoint at (pipe, data, tensor) = (2,1,2) and resumed at (2,1,2)
  and at (1,2,2) continues the loss curve of a run that never stopped, and ends with its weights;
- the V schedules at (2,1,2): dualpipev with enough micro-batches (2 x pipe) and zb_v, against the
  transformers model trained in one process.

One launch of 4 ranks runs every case (workers join torch.distributed themselves: backend=None).
"""

from __future__ import annotations

import pytest
import torch

import pipegrid as pg
from pipegrid import hf
from pipegrid.launch import run_local
from pipegrid.pipe.checkpoint import CheckpointError
from tests.support.hf_models import ATTN, lm_batches, load_reference, reference_step, save_tiny

STEPS, SAVED_AT, MICRO_BATCHES, CLIP = 4, 2, 4, 0.5
SGD = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}  # momentum: optimizer state must resume too
RTOL, ATOL = 1e-5, 1e-6


def _config(pipe: int, data: int, schedule: str = "1f1b", virtual_stages: int = 1) -> dict:
    return {"topology": {"pipe": pipe, "data": data, "tensor": 2},
            "schedule": {"name": schedule, "micro_batches": MICRO_BATCHES // data, "virtual_stages": virtual_stages},
            "optimizer": SGD, "train": {"grad_clip": CLIP}, "comm": {"timeout_s": 60, "bind_cores": False}}


def _global_batch(step: int) -> list:
    return lm_batches(MICRO_BATCHES, seed=100 + step, padded=True)


def _engine(directory: str, cfg: dict, **model_kwargs) -> tuple[pg.PipelineEngine, hf.HFCausalLM]:
    topology = pg.Topology(**cfg["topology"])
    model = hf.from_pretrained(directory, topology=topology, attn_implementation=ATTN,
                               virtual_stages=cfg["schedule"]["virtual_stages"], **model_kwargs)
    assert model.process_groups is not None, "no tensor_group given: the model builds pipegrid's groups"
    engine = pg.initialize(model, cfg)
    assert engine.groups is model.process_groups, "initialize reuses the groups the model was split over"
    return engine, model


def _steps(engine: pg.PipelineEngine, steps: range) -> list[float]:
    data, per_rank = engine.groups.coord.data, engine.config.schedule.micro_batches
    return [engine.train_batch(iter(_global_batch(s)[data * per_rank:(data + 1) * per_rank])) for s in steps]


def _whole(model: hf.HFCausalLM) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in model.hf_state_dict().items()}


def _resume_cases(directory: str, checkpoint: str) -> dict:
    engine, model = _engine(directory, _config(2, 1))
    straight = {"losses": _steps(engine, range(STEPS)), "tensors": _whole(model)}
    engine, _ = _engine(directory, _config(2, 1))
    before = _steps(engine, range(SAVED_AT))
    engine.save_checkpoint(checkpoint)
    out = {"straight": straight}
    for name, cfg in {"same": _config(2, 1), "pipe1_data2": _config(1, 2)}.items():
        engine, model = _engine(directory, cfg)
        assert engine.load_checkpoint(checkpoint) == SAVED_AT
        out[name] = {"losses": before + _steps(engine, range(SAVED_AT, STEPS)), "tensors": _whole(model)}
    tensor_1 = {**_config(2, 2), "topology": {"pipe": 2, "data": 2, "tensor": 1}}
    engine = pg.initialize(hf.from_pretrained(directory, topology=pg.Topology(pipe=2, data=2)), tensor_1)
    with pytest.raises(CheckpointError, match=r"has tensor=2 shards per layer, this run has tensor=1; resume with "
                                              r"topology.tensor=2"):
        engine.load_checkpoint(checkpoint)  # another tensor degree: refused, naming the fix
    return out


def _v_schedule_cases(directories: dict[str, str]) -> dict:
    out = {}
    for name, (family, schedule) in {"dualpipev": ("llama", "dualpipev"), "zb_v": ("gpt2", "zb_v")}.items():
        engine, model = _engine(directories[family], _config(2, 1, schedule, virtual_stages=2), stage_placement="v")
        out[name] = {"losses": _steps(engine, range(STEPS)), "tensors": _whole(model)}
    return out


def _worker(directories: dict[str, str], checkpoint: str) -> dict:
    return {**_resume_cases(directories["llama"], checkpoint), **_v_schedule_cases(directories)}


def _reference(directory: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = load_reference(directory).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD["lr"], momentum=SGD["momentum"])
    losses = [reference_step(model, _global_batch(s), optimizer, CLIP) for s in range(STEPS)]
    return losses, model.state_dict()


def _assert_same(name: str, got: dict, losses: list[float], state: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{name} losses: {m}")
    for key, value in got["tensors"].items():
        torch.testing.assert_close(value, state[key], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, key=key: f"{name} {key}: {m}")


def test_resume_at_tensor_2_and_v_schedules(tmp_path):
    directories = {family: save_tiny(family, str(tmp_path / family)) for family in ("llama", "gpt2")}
    per_rank = run_local(_worker, 4, (directories, str(tmp_path / "ckpt")), timeout_s=300, backend=None)
    llama_losses, llama_state = _reference(directories["llama"])
    gpt2_losses, gpt2_state = _reference(directories["gpt2"])
    for rank, result in enumerate(per_rank):
        straight = result["straight"]
        _assert_same(f"rank {rank} never stopped", straight, llama_losses, llama_state)
        for name in ("same", "pipe1_data2"):  # the curve never stopped, and its end (= the reference's)
            _assert_same(f"rank {rank} resumed at {name}", result[name], straight["losses"], llama_state)
        _assert_same(f"rank {rank} dualpipev", result["dualpipev"], llama_losses, llama_state)
        _assert_same(f"rank {rank} zb_v", result["zb_v"], gpt2_losses, gpt2_state)
    assert {key for r in per_rank for key in r["zb_v"]["tensors"]} >= set(gpt2_state) - {"lm_head.weight"}
