"""Shared pieces of the engine tests: the pipeline run on each rank and the
one-process reference it must match (design.md, invariant 1)."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

import pipegrid as pg
from examples.models.gpt import GPT
from pipegrid.schedules import SCHEDULES
from tests.support.models import TinyGPT, cross_entropy, gpt_batches, gpt_layers
from tests.support.tensor_gpt import GPT_CFG, sharded_state

N_LAYER = 3
STEPS = 3


def global_batches(step: int, data: int, micro_batches: int) -> list:
    """The global batch of one step: data x micro_batches micro-batches, data rank d takes slice d."""
    return gpt_batches(num_micro_batches=data * micro_batches, seed=100 + step)


def canonical_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters keyed by global layer index, whatever stage or chunk holds them."""
    return {re.sub(r"^stages\.\d+\.", "", name): p.detach().clone() for name, p in module.named_parameters()}


def config(schedule: str, pipe: int, data: int, micro_batches: int, dtype: str = "float32",
           optimizer: dict | None = None, grad_clip: float = 0.5, coalesce: int = 1, **extra: Any) -> dict:
    return {"topology": {"pipe": pipe, "data": data},
            "schedule": {"name": schedule, "micro_batches": micro_batches, "coalesce": coalesce,
                         "virtual_stages": (SCHEDULES[schedule].chunks or (2,))[0]},  # interleaved: 2
            "optimizer": optimizer or {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
            "precision": {"dtype": dtype}, "train": {"grad_clip": grad_clip}, "comm": {"timeout_s": 60},
            **extra}


def run_pipeline(cfg: dict, steps: int = STEPS) -> dict:
    """On every rank: build this rank's stage, train ``steps`` steps, return losses and parameters."""
    topo = pg.Topology(**cfg["topology"])
    model = TinyGPT(N_LAYER, topology=topo, virtual_stages=cfg["schedule"]["virtual_stages"],
                    stage_placement=SCHEDULES[cfg["schedule"]["name"]].placement or "loop")
    engine = pg.initialize(model, cfg)
    data_rank = topo.coord(dist.get_rank()).data
    m = cfg["schedule"]["micro_batches"]
    losses = []
    for step in range(steps):
        mine = global_batches(step, topo.data, m)[data_rank * m:(data_rank + 1) * m]
        losses.append(engine.train_batch(iter(mine)))
    return {"losses": losses, "state": canonical_state(engine.module)}


def run_reference(cfg: dict, steps: int = STEPS, layers: list | None = None) -> dict:
    """One process, the same global batch by gradient accumulation (of ``layers``, default TinyGPT's)."""
    dtype = getattr(torch, cfg["precision"]["dtype"])
    model = pg.build_reference(layers or gpt_layers(N_LAYER), loss_fn=cross_entropy).to(dtype)
    opt_cfg = dict(cfg["optimizer"])
    target = opt_cfg.pop("_target_").rsplit(".", 1)[1]
    optimizer = getattr(torch.optim, target)(model.parameters(), **opt_cfg)
    data, m = cfg["topology"]["data"], cfg["schedule"]["micro_batches"]
    losses = []
    for step in range(steps):
        batches = global_batches(step, data, m)
        total = 0.0
        for ids, labels in batches:
            loss = cross_entropy(model(ids), labels)
            (loss / len(batches)).backward()
            total += loss.item()
        clip = cfg["train"]["grad_clip"]
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / len(batches))
    return {"losses": losses, "state": canonical_state(model)}


def loaded_outputs(cfg: dict, directory: str, load_optimizer_states: bool = True) -> tuple[int, list | None]:
    """On every rank: a fresh engine loads ``directory``'s checkpoint; the step it resumes at
    and ``eval_batch``'s outputs on two fixed micro-batches (None but on the last stage)."""
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    step = engine.load_checkpoint(directory, load_optimizer_states=load_optimizer_states)
    _, outputs = engine.eval_batch(iter(gpt_batches(2, seed=7)), return_outputs=True)
    return step, outputs


def assert_matches_reference(results: list[dict], reference: dict, rtol: float, atol: float) -> None:
    """Every rank reports the reference losses; the union of stages equals the reference model."""
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.tensor(result["losses"], dtype=torch.float64),
                                   torch.tensor(reference["losses"], dtype=torch.float64),
                                   rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} losses: {m}")
    seen = set()
    for rank, result in enumerate(results):
        for name, value in result["state"].items():
            torch.testing.assert_close(value, reference["state"][name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"rank {rank} parameter {name}: {m}")
            seen.add(name)
    assert seen == set(reference["state"]), f"parameters never trained: {set(reference['state']) - seen}"


def run_zero_pipeline(cfg: dict, recompute: int = 0, layers: list | None = None) -> dict:
    """``run_pipeline`` for the ZeRO-2/3 tests: ZeRO-3's parameters gathered before reading them,
    and what the rank held: ``memory`` between steps, the parameter bytes gathered for a step
    (``step_parameter_bytes``; ZeRO < 3: the parameters) and the peak of them inside it, and
    the gradient bytes beside the shard during the last step (``step_gradient_bytes``).
    ``layers``: another model than TinyGPT's."""
    topo = pg.Topology(**cfg["topology"])
    model = pg.PipelineModule(layers or gpt_layers(N_LAYER), loss_fn=cross_entropy, topology=topo,
                              virtual_stages=cfg["schedule"]["virtual_stages"],
                              stage_placement=SCHEDULES[cfg["schedule"]["name"]].placement or "loop",
                              activation_checkpoint_interval=recompute)
    engine = pg.initialize(model, cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(global_batches(s, topo.data, m)[d * m:(d + 1) * m])) for s in range(STEPS)]
    memory = engine.memory_report()
    peak = getattr(engine.zero, "peak_parameter_bytes", None)
    engine.gather_parameters()
    return {"losses": losses, "state": canonical_state(engine.module), "memory": memory,
            "step_parameter_bytes": getattr(engine.zero, "step_parameter_bytes", memory["parameters"]),
            "peak_parameter_bytes": peak, "step_gradient_bytes": getattr(engine.zero, "step_gradient_bytes", None)}


def run_tensor_gpt(cfg: dict, steps: int = STEPS, gpt_cfg: Any = GPT_CFG) -> dict:
    """The example GPT (``gpt_cfg``) split over the tensor group: losses and each rank's shards."""
    groups = pg.init_distributed(cfg)
    model = GPT(gpt_cfg, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    engine = pg.initialize(model, cfg, groups=groups)
    d, m, data = groups.coord.data, cfg["schedule"]["micro_batches"], groups.topology.data
    losses = [engine.train_batch(iter(global_batches(s, data, m)[d * m:(d + 1) * m])) for s in range(steps)]
    engine.gather_parameters()
    return {"losses": losses, "state": sharded_state(engine.module), "coord": tuple(groups.coord)}
