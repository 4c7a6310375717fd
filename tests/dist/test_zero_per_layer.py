"""ZeRO-3 with ``zero.gather=per_layer`` trains like one process (design.md invariant 1): all six
schedules at pipe 2 x data 2 with TinyGPT's tied layers (zb_h1's split backward: W gathers again;
interleaved's two chunks; zb_v and dualpipev with the tied embedding and head on one pipe rank),
activation checkpointing (recompute gathers), tensor=2; bf16 bit-identical to ``per_step``; fewer
parameter bytes at the step's peak, none between steps.

All cases of the 4-rank world run in one ``run_local`` call; the references run in this process.
"""

from __future__ import annotations

import pytest
import torch

from pipegrid.launch import run_local
from tests.support.engine_cases import (
    assert_matches_reference,
    config,
    global_batches,
    run_reference,
    run_tensor_gpt,
    run_zero_pipeline,
)
from tests.support.reference import PlainGPT, train
from tests.support.tensor_gpt import GPT_CFG, assert_matches_dense

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}
M = 4
PER_LAYER = {"stage": 3, "gather": "per_layer"}


def _cfg(schedule: str, *, dtype: str = "float32", gather: str = "per_layer") -> dict:
    return config(schedule, 2, 2, M, dtype=dtype, optimizer=ADAM, grad_clip=0.5, zero={"stage": 3, "gather": gather})


CASES = {
    **{s: _cfg(s) for s in ("gpipe", "1f1b", "zb_h1", "interleaved_1f1b", "zb_v", "dualpipev")},
    "recompute-zb_h1": _cfg("zb_h1"),
    "recompute-1f1b": _cfg("1f1b"),
    "bf16-per_step": _cfg("1f1b", dtype="bfloat16", gather="per_step"),
    "bf16-per_layer": _cfg("1f1b", dtype="bfloat16"),
}
TENSOR = {**config("1f1b", 1, 2, M, optimizer=ADAM, grad_clip=0.05, zero=PER_LAYER),
          "topology": {"pipe": 1, "data": 2, "tensor": 2}}


def _all_cases(cases: dict, tensor: dict) -> dict:
    out = {name: run_zero_pipeline(cfg, recompute=int("recompute" in name)) for name, cfg in cases.items()}
    out["tensor"] = run_tensor_gpt(tensor)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    per_rank = run_local(_all_cases, 4, (CASES, TENSOR), timeout_s=300)
    return {name: [rank[name] for rank in per_rank] for name in per_rank[0]}


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb_h1", "interleaved_1f1b", "zb_v", "dualpipev", "recompute-zb_h1",
                                  "recompute-1f1b"])
def test_per_layer_gathering_matches_the_reference(results, name):
    assert_matches_reference(results[name], run_reference(CASES[name]), rtol=1e-5, atol=1e-6)


def test_per_layer_with_tensor_parallel_matches_the_dense_reference(results):
    reference = train(PlainGPT(GPT_CFG), [global_batches(s, 2, M) for s in range(3)], ADAM, 0.05)
    assert_matches_dense(results["tensor"], reference)


def test_bf16_per_layer_is_identical_to_per_step(results):
    for rank, (step, layer) in enumerate(zip(results["bf16-per_step"], results["bf16-per_layer"])):
        assert step["losses"] == layer["losses"], f"rank {rank}"
        for name, value in step["state"].items():
            assert torch.equal(value, layer["state"][name]), f"rank {rank} {name}"


def test_per_layer_holds_less_at_the_peak_and_nothing_between_steps(results):
    for name in ("1f1b", "interleaved_1f1b", "recompute-1f1b"):
        for rank in results[name]:
            assert rank["memory"]["parameters"] == 0, (name, rank["memory"])
            peak, whole = rank["peak_parameter_bytes"], rank["step_parameter_bytes"]
            assert 0 < peak < whole, (name, peak, whole)
    for step in results["bf16-per_step"]:
        assert step["peak_parameter_bytes"] == step["step_parameter_bytes"]  # per step: the whole parameters at once
