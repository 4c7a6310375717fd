"""pipegrid.hf on gloo: transformers checkpoints trained through the pipeline match the
transformers model trained in one process, and come back out as transformers checkpoints.

Each grid runs every case in one ``run_local`` call: three families (GPT-2 tied, Llama
with grouped-query attention untied, Qwen2 tied), two schedules, plain and padded
batches, gradient clipping on; after 3 steps the losses, every parameter, the logits
``eval_batch`` returns and the logits of the saved directory loaded by transformers
must equal the one-process model's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid import hf
from pipegrid.launch import run_local
from tests.support.hf_models import (ATTN, FAMILIES, assert_ranks_match, lm_batches, load_reference, reference_step,
                                      save_tiny)

STEPS = 3
CLIP = 0.5
SGD = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}
# eps well above float32 noise: a parameter whose true gradient is 0 (attention key biases)
# gets last-bit noise that differs between reduction orders, which plain Adam would blow up
ADAM = {"_target_": "torch.optim.AdamW", "lr": 1e-2, "eps": 1e-5}
RTOL, ATOL = 1e-5, 1e-6


def _config(schedule: str, pipe: int, data: int, micro_batches: int = 3, optimizer: dict = SGD, **extra) -> dict:
    return {"topology": {"pipe": pipe, "data": data},
            "schedule": {"name": schedule, "micro_batches": micro_batches,
                         "virtual_stages": 2 if schedule == "interleaved_1f1b" else 1},
            "optimizer": optimizer, "train": {"grad_clip": CLIP}, "comm": {"timeout_s": 60}, **extra}


def _step_batches(step: int, data: int, micro_batches: int, padded: bool) -> list:
    return lm_batches(micro_batches * data, seed=100 + step, padded=padded)


def _eval_batches(case: dict, m: int) -> list:
    """Batches to compare logits on, in the case's form: the pipeline keeps one message layout."""
    return lm_batches(m, seed=7, padded=case["padded"])


def _train(case: dict) -> dict:
    """On every rank: load, train STEPS steps, evaluate, save; losses, local tensors, logits."""
    cfg = case["config"]
    topo = pg.Topology(**cfg["topology"])
    model = hf.from_pretrained(case["dir"], topology=topo, attn_implementation=ATTN,
                               virtual_stages=cfg["schedule"]["virtual_stages"], **case.get("model", {}))
    engine = pg.initialize(model, cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(_step_batches(s, topo.data, m, case["padded"])[d * m:(d + 1) * m]))
              for s in range(STEPS)]
    _, logits = engine.eval_batch(iter(_eval_batches(case, m)), return_outputs=True)
    if case.get("save"):
        hf.save_pretrained(engine, case["save"])
    tensors = {key: t.detach().clone() for stage in model.stage_ids
               for _, layer in model.local_layers(stage) for key, t in layer.hf_tensors()}
    return {"losses": losses, "tensors": tensors, "logits": logits}


def _run_cases(cases: list[dict]) -> list[dict]:
    return [_train(case) for case in cases]


_REFERENCES: dict[tuple, tuple[torch.nn.Module, list[float]]] = {}


def _reference(case: dict) -> tuple[torch.nn.Module, list[float]]:
    """The transformers model trained in one process on the case's global batches (computed once
    per checkpoint, batches and optimizer: the schedule and the pipe degree do not change it)."""
    cfg = case["config"]
    key = (case["dir"], case["padded"], cfg["topology"]["data"], cfg["schedule"]["micro_batches"],
           tuple(sorted(cfg["optimizer"].items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = _train_reference(case)
    return _REFERENCES[key]


def _train_reference(case: dict) -> tuple[torch.nn.Module, list[float]]:
    cfg = case["config"]
    model = load_reference(case["dir"]).train()
    opt_cfg = dict(cfg["optimizer"])
    optimizer = getattr(torch.optim, opt_cfg.pop("_target_").rsplit(".", 1)[1])(model.parameters(), **opt_cfg)
    data, m = cfg["topology"]["data"], cfg["schedule"]["micro_batches"]
    losses = [reference_step(model, _step_batches(s, data, m, case["padded"]), optimizer, CLIP) for s in range(STEPS)]
    return model.eval(), losses


@torch.no_grad()
def _logits(model: torch.nn.Module, batches: list) -> list[torch.Tensor]:
    inputs = [x if isinstance(x, tuple) else (x, None) for x, _ in batches]
    return [model(input_ids=ids, attention_mask=mask).logits for ids, mask in inputs]


def _check(case: dict, per_rank: list[dict], rtol: float = RTOL, atol: float = ATOL) -> None:
    reference, losses = _reference(case)
    state = reference.state_dict()
    name = f"{os.path.basename(case['dir'])} {case['config']['schedule']['name']} padded={case['padded']}"
    assert_ranks_match(name, per_rank, losses, state, reference.config.tie_word_embeddings, rtol, atol)
    m = case["config"]["schedule"]["micro_batches"]
    want = _logits(reference, _eval_batches(case, m))
    last = [r["logits"] for r in per_rank if r["logits"] is not None]
    assert last, f"{name}: no rank returned logits"
    for logits in last:
        for got, expected in zip(logits, want):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name} eval logits: {m}")
    if case.get("save"):
        for got, expected in zip(_logits(load_reference(case["save"]), _eval_batches(case, m)), want):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name} saved: {m}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny(family, str(root / family)) for family in FAMILIES}


@pytest.mark.parametrize("pipe,data", [(2, 1), (3, 1), (2, 2)])
def test_trains_and_saves_like_transformers(checkpoints, tmp_path, pipe, data):
    cases = [{"dir": checkpoints[family], "config": _config(schedule, pipe, data), "padded": padded,
              "save": str(tmp_path / f"{family}-{schedule}-{padded}")}
             for family in FAMILIES for schedule in ("1f1b", "zb_h1") for padded in (False, True)]
    per_rank = run_local(_run_cases, pipe * data, (cases,), timeout_s=240)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in per_rank])


def test_composes_with_zero_interleaving_and_activation_checkpointing(checkpoints, tmp_path):
    cases = [
        {"dir": checkpoints["llama"], "padded": True, "save": str(tmp_path / "zero"),
         "config": _config("1f1b", 2, 2, 2, optimizer=ADAM, zero={"stage": 1})},
        {"dir": checkpoints["gpt2"], "padded": True, "save": str(tmp_path / "zero-tied"),
         "config": _config("gpipe", 2, 2, 2, optimizer=ADAM, zero={"stage": 1})},
        {"dir": checkpoints["qwen2"], "padded": True, "save": str(tmp_path / "interleaved"),
         "config": _config("interleaved_1f1b", 2, 2, 4), "model": {"activation_checkpoint_interval": 1}},
    ]
    per_rank = run_local(_run_cases, 4, (cases,), timeout_s=240)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in per_rank])


def _bf16(directory: str, out: str) -> list | None:
    cfg = _config("1f1b", 2, 1, 2, precision={"dtype": "bfloat16"}, zero={"stage": 1})
    engine = pg.initialize(hf.from_pretrained(directory, topology=pg.Topology(pipe=2), attn_implementation=ATTN), cfg)
    for step in range(2):
        engine.train_batch(iter(_step_batches(step, 1, 2, padded=True)))
    hf.save_pretrained(engine, out)
    return engine.eval_batch(iter(lm_batches(2, seed=7, padded=True)), return_outputs=True)[1]


def test_bf16_saves_bf16_weights_transformers_loads(checkpoints, tmp_path):
    logits = run_local(_bf16, 2, (checkpoints["gpt2"], str(tmp_path / "bf16")), timeout_s=120)[-1]
    saved = load_reference(str(tmp_path / "bf16"), dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16
    for got, want in zip(logits, _logits(saved, lm_batches(2, seed=7, padded=True))):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)  # the same bf16 weights and ops
    assert not any(name.startswith(".") for name in os.listdir(tmp_path)), "a temporary directory was left"


def _train_and_checkpoint(directory: str, pipe: int, checkpoint: str, train: bool) -> list | None:
    cfg = _config("1f1b", pipe, 1, 2, optimizer=ADAM)
    engine = pg.initialize(hf.from_pretrained(directory, topology=pg.Topology(pipe=pipe), attn_implementation=ATTN),
                           cfg)
    if train:
        for step in range(2):
            engine.train_batch(iter(_step_batches(step, 1, 2, padded=True)))
        engine.save_checkpoint(checkpoint)
    else:
        assert engine.load_checkpoint(checkpoint, load_optimizer_states=False) == 2
    return engine.eval_batch(iter(lm_batches(2, seed=7, padded=True)), return_outputs=True)[1]


def test_pipegrid_checkpoint_at_pipe2_loads_at_pipe3(checkpoints, tmp_path):
    directory = checkpoints["qwen2"]
    saved = run_local(_train_and_checkpoint, 2, (directory, 2, str(tmp_path), True), timeout_s=120)[-1]
    loaded = run_local(_train_and_checkpoint, 3, (directory, 3, str(tmp_path), False), timeout_s=120)[-1]
    fresh = _logits(load_reference(directory).eval(), lm_batches(2, seed=7, padded=True))
    for got, want, before in zip(loaded, saved, fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.allclose(got, before), "the checkpoint's trained weights were not loaded"


def _resume(directory: str, checkpoint: str | None, until: int) -> tuple[int, list[float]]:
    """Train until global step ``until``, resuming from ``checkpoint`` (checkpoint.dir) when it holds one."""
    extra = {"checkpoint": {"dir": checkpoint, "interval": 2}} if checkpoint else {}
    cfg = _config("1f1b", 2, 1, 2, optimizer=ADAM, **extra)
    engine = pg.initialize(hf.from_pretrained(directory, topology=pg.Topology(pipe=2), attn_implementation=ATTN),
                           cfg)
    start = engine.global_steps
    losses = [engine.train_batch(iter(_step_batches(step, 1, 2, padded=True))) for step in range(start, until)]
    return start, losses


def test_resume_from_a_pipegrid_checkpoint_continues_the_same_losses(checkpoints, tmp_path):
    directory = checkpoints["llama"]
    _, straight = run_local(_resume, 2, (directory, None, 4), timeout_s=120)[-1]
    first = run_local(_resume, 2, (directory, str(tmp_path), 3), timeout_s=120)[-1]  # saves at step 2
    resumed = run_local(_resume, 2, (directory, str(tmp_path), 4), timeout_s=120)[-1]
    assert first == (0, straight[:3])
    assert resumed == (2, straight[2:])  # weights, Adam state and data position back: identical losses
