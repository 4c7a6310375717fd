"""ZeRO-2 and ZeRO-3 train like one process (design.md invariant 1): every schedule at pipe x data =
2 x 2 in float32 with Adam and clipping, the tied embedding and head of TinyGPT, gradients
reduce-scattered once per step and after every micro-batch; bf16 and fp16 identical to ZeRO-1;
tensor=2; activation checkpointing; parameters and gradients held between steps; offload on a CPU run.

All cases of the 4-rank world run in one ``run_local`` call (start-up dominates); the
references run in this process.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import run_local
from tests.support.engine_cases import (
    assert_matches_reference,
    config,
    global_batches,
    run_reference,
    run_tensor_gpt,
    run_zero_pipeline,
)
from tests.support.models import TinyGPT
from tests.support.reference import PlainGPT, train
from tests.support.tensor_gpt import GPT_CFG, assert_matches_dense

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}  # eps: see test_zero_precision.py
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v", "dualpipev")
PER_MICRO_BATCH = ("1f1b", "interleaved_1f1b", "zb_h1", "dualpipev")  # B, split I/W, two chunks, the V
M = 4  # micro-batches per data rank (interleaved: a multiple of pipe)


def _cfg(schedule: str, stage: int, *, every: bool = False, dtype: str = "float32", pipe: int = 2) -> dict:
    return config(schedule, pipe, 2, M, dtype=dtype, optimizer=ADAM, grad_clip=0.5,
                  zero={"stage": stage, "reduce_every_micro_batch": every})


CASES = {
    **{f"zero{stage}-{s}": _cfg(s, stage) for stage in (2, 3) for s in SCHEDULES},
    "zero3-every-zb_h1": _cfg("zb_h1", 3, every=True),
    "zero3-recompute-zb_h1": _cfg("zb_h1", 3),  # activation checkpointing: the backwards recompute
    "bf16-zero3": _cfg("1f1b", 3, dtype="bfloat16"),
    **{f"fp16-zero{stage}": {**_cfg("1f1b", stage, dtype="float16"),
                             "precision": {"dtype": "float16", "initial_loss_scale": 1024.0}} for stage in (1, 2, 3)},
    **{f"zero2-every-{s}": _cfg(s, 2, every=True) for s in PER_MICRO_BATCH},
    "bf16-zero1": _cfg("1f1b", 1, dtype="bfloat16"),
    "bf16-zero2": _cfg("1f1b", 2, dtype="bfloat16"),
    "bf16-zero2-every": _cfg("1f1b", 2, every=True, dtype="bfloat16"),
}
TENSOR = {**config("1f1b", 1, 2, M, optimizer=ADAM, grad_clip=0.05, zero={"stage": 2}),
          "topology": {"pipe": 1, "data": 2, "tensor": 2}}
TENSOR3 = {**TENSOR, "zero": {"stage": 3}}


def _memory(cfg: dict) -> dict:
    """Gradient bytes after a step (what the optimizer step held) at ZeRO-1 and ZeRO-2."""
    engine = pg.initialize(TinyGPT(3, topology=pg.Topology(**cfg["topology"])), cfg)
    d = engine.groups.coord.data
    engine.train_batch(iter(global_batches(0, 4, M)[d * M:(d + 1) * M]))
    return {"memory": engine.memory_report(), "step_gradient_bytes": getattr(engine.zero, "step_gradient_bytes", 0),
            "rank": dist.get_rank()}


def _offload_on_a_cpu_run() -> dict:
    """zero.offload_optimizer=cpu where everything is on the CPU already: the notice, and no host part."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipegrid").addHandler(handler)
    try:
        result = _memory(config("1f1b", 1, 4, M, optimizer=ADAM, zero={"stage": 2, "offload_optimizer": "cpu"},
                                topology={"pipe": 1, "data": 4}))
    finally:
        logging.getLogger("pipegrid").removeHandler(handler)
    return {**result, "messages": messages}


def _all_cases(cases: dict, tensor: dict, tensor3: dict) -> dict:
    out = {name: run_zero_pipeline(cfg, recompute=int("recompute" in name)) for name, cfg in cases.items()}
    out["tensor"], out["tensor-zero3"] = run_tensor_gpt(tensor), run_tensor_gpt(tensor3)
    for stage in (1, 2):
        out[f"memory-zero{stage}"] = _memory(config("1f1b", 1, 4, M, optimizer=ADAM, zero={"stage": stage},
                                                    topology={"pipe": 1, "data": 4}))
    out["offload-cpu-run"] = _offload_on_a_cpu_run()
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    per_rank = run_local(_all_cases, 4, (CASES, TENSOR, TENSOR3), timeout_s=500)
    return {name: [rank[name] for rank in per_rank] for name in per_rank[0]}


@pytest.mark.parametrize("name", [*(f"zero{stage}-{s}" for stage in (2, 3) for s in SCHEDULES),
                                  *(f"zero2-every-{s}" for s in PER_MICRO_BATCH), "zero3-every-zb_h1",
                                  "zero3-recompute-zb_h1"])
def test_zero2_and_zero3_match_the_reference(results, name):
    assert_matches_reference(results[name], run_reference(CASES[name]), rtol=1e-5, atol=1e-6)


def test_bf16_zero3_is_identical_to_zero1(results):
    for rank, (one, three) in enumerate(zip(results["bf16-zero1"], results["bf16-zero3"])):
        assert one["losses"] == three["losses"], f"rank {rank}"
        for name, value in one["state"].items():
            assert torch.equal(value, three["state"][name]), f"rank {rank} {name}"


def test_zero3_holds_only_the_master_shard_between_steps(results):
    for one, three in zip(results["bf16-zero1"], results["bf16-zero3"]):
        assert three["memory"]["parameters"] == 0, three["memory"]  # freed after the optimizer step
        assert three["step_parameter_bytes"] == one["memory"]["parameters"]  # whole while the step runs
        assert three["memory"]["master_weights"] == one["memory"]["master_weights"] > 0  # the fp32 shard stays


def test_fp16_zero2_and_zero3_are_identical_to_zero1(results):
    # the loss scale, the overflow check over the gradient shards and the unscaling as ZeRO-1's
    for one, two, three in zip(results["fp16-zero1"], results["fp16-zero2"], results["fp16-zero3"]):
        assert one["losses"] == two["losses"] == three["losses"]
        for name, value in one["state"].items():
            assert torch.equal(value, two["state"][name]) and torch.equal(value, three["state"][name]), name


def test_bf16_zero2_is_identical_to_zero1(results):
    # once per step the fp32 sums run in ZeRO-1's order: bit for bit; per micro-batch the data
    # sum comes first, a different fp32 order, so within fp32 rounding of the master step
    for rank, (one, two, every) in enumerate(zip(results["bf16-zero1"], results["bf16-zero2"],
                                                 results["bf16-zero2-every"])):
        assert one["losses"] == two["losses"], f"rank {rank}"
        for name, value in one["state"].items():
            assert torch.equal(value, two["state"][name]), f"rank {rank} {name}"
            torch.testing.assert_close(every["state"][name].float(), value.float(), rtol=0, atol=2 ** -7,
                                       msg=lambda e, r=rank, n=name: f"rank {r} {n} per micro-batch: {e}")


@pytest.mark.parametrize("name", ["tensor", "tensor-zero3"])
def test_zero2_and_zero3_with_tensor_parallel_match_the_dense_reference(results, name):
    reference = train(PlainGPT(GPT_CFG), [global_batches(s, 2, M) for s in range(3)], ADAM, 0.05)
    assert min(reference["norms"]) > 0.05, reference["norms"]  # clipping bites every step
    assert_matches_dense(results[name], reference)


def test_zero2_holds_only_the_gradient_shard_at_the_step(results):
    for one, two in zip(results["memory-zero1"], results["memory-zero2"]):
        full = one["memory"]["gradients"]
        assert two["memory"]["gradients"] * 4 == full, (one, two)  # data=4: a quarter, padding included
        assert two["step_gradient_bytes"] == full  # during the backwards the buffer is full size


def test_offload_on_a_cpu_run_changes_nothing_and_says_so_once(results):
    per_rank = results["offload-cpu-run"]
    notices = [m for r in per_rank for m in r["messages"] if "offload_optimizer" in m]
    assert len(notices) == 1 and "nothing is offloaded" in notices[0], notices
    for plain, offload in zip(results["memory-zero2"], per_rank):
        assert offload["memory"] == plain["memory"]
