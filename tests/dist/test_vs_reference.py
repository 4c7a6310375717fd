"""What users run, against the plain-torch one-process reference (tests/support/reference.py).

ZeRO-1 under gpipe, interleaved_1f1b and zb_h1, and under 1f1b at data 2 and pipe x data with
Adam and with SGD momentum (5 steps); bf16 and fp16 at pipe 1, 2, 3 and pipe x data with ZeRO-1
(against float32 too; bf16 at pipe 2 over 5 steps); tensor=2 under gpipe, interleaved_1f1b and zb_h1, under 1f1b
alone, with pipe and with data and ZeRO-1 (clipping off and on), and once on a 2 x 2 x 2 grid;
``eval_batch(return_outputs=True)`` after training for every schedule at data=1 and data=2;
``comm.dynamic_shapes``; gradient clipping that bites; activation checkpointing under zb_h1.
The cases of one world size run in one ``run_local`` call (one start-up), the reference in
this process. (Weights saved at one pipe degree and trained on at another:
tests/dist/test_reshard.py.)
"""

from __future__ import annotations

import os

import pytest
import torch

import pipegrid as pg
from examples.models.gpt import GPT
from pipegrid.launch import run_local
from tests.support.engine_cases import N_LAYER, assert_matches_reference, canonical_state, config, global_batches
from tests.support.models import TinyGPT, gpt_batches
from tests.support.reference import PlainGPT, PlainTinyGPT, evaluate, train
from tests.support.tensor_gpt import GPT_CFG, assert_matches_dense, sharded_state  # shards put back together

STEPS = 3
GLOBAL = 4  # micro-batches per step whatever the data degree: every layout sees the same global batch
SGD = {"_target_": "torch.optim.SGD", "lr": 0.2, "momentum": 0.9}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}  # eps: see test_zero_precision.py
CLIP = 0.5
EVAL = gpt_batches(GLOBAL, seed=7)
LOW_PRECISION_LAYOUTS = [(1, 1, 0), (2, 1, 0), (3, 1, 0), (2, 2, 1)]  # (pipe, data, zero.stage)
TENSOR_LAYOUTS = [(1, 1, 0), (2, 1, 0), (1, 2, 1)]  # (pipe, data, zero.stage) at tensor=2 under 1f1b
TENSOR_CLIP = 0.05  # small enough that every step clips


def _case(kind: str, schedule: str, pipe: int, data: int, *, zero: int = 0, dtype: str = "float32",
          optimizer: dict = SGD, clip: float = CLIP, tensor: int = 1, dynamic: bool = False, recompute: int = 0,
          evaluate: bool = False, steps: int = STEPS) -> dict:
    precision = {"dtype": dtype, **({"initial_loss_scale": 1024.0} if dtype == "float16" else {})}
    cfg = config(schedule, pipe, data, GLOBAL // data, dtype=dtype, optimizer=optimizer, grad_clip=clip,
                 zero={"stage": zero}, precision=precision,
                 comm={"timeout_s": 60, "dynamic_shapes": dynamic})
    cfg["topology"]["tensor"] = tensor
    return {"kind": kind, "cfg": cfg, "dynamic": dynamic, "recompute": recompute, "evaluate": evaluate,
            "steps": steps}


CASES = {
    **{f"zero1-{s}": _case("train", s, 2, 2, zero=1, optimizer=ADAM, evaluate=True)
       for s in ("gpipe", "interleaved_1f1b", "zb_h1")},
    # ZeRO-1 under 1f1b, the data axis alone and with pipe, two optimizers' states sharded
    **{f"zero1-1f1b-{p}x2-{name}": _case("train", "1f1b", p, 2, zero=1, optimizer=optimizer, clip=1.0, steps=5)
       for p in (1, 2) for name, optimizer in (("adam", ADAM), ("sgd", SGD))},
    "eval-1f1b": _case("train", "1f1b", 2, 2, evaluate=True),
    **{f"eval-{s}-data1": _case("train", s, 2, 1, evaluate=True)
       for s in ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")},
    "dynamic-shapes": _case("train", "1f1b", 2, 2, dynamic=True, evaluate=True),
    "clip-bites": _case("train", "zb_h1", 2, 2, clip=0.05),
    "recompute-zb_h1": _case("train", "zb_h1", 2, 2, recompute=1),
    **{f"tensor2-{s}": _case("tensor", s, 2, 1, tensor=2) for s in ("gpipe", "interleaved_1f1b", "zb_h1")},
    # tensor=2 under 1f1b alone, with pipe, and with data and ZeRO-1; clipping off, and biting every step
    **{f"tensor2-1f1b-{p}x{d}x{z}-clip{clip}": _case("tensor", "1f1b", p, d, zero=z, tensor=2, clip=clip)
       for p, d, z in TENSOR_LAYOUTS for clip in (0.0, TENSOR_CLIP)},
    **{f"{dtype}-{p}x{d}x{z}": _case("train", "1f1b", p, d, zero=z, dtype=dtype)
       for dtype in ("bfloat16", "float16") for p, d, z in LOW_PRECISION_LAYOUTS},
    "bfloat16-2x1x0-5-steps": _case("train", "1f1b", 2, 1, dtype="bfloat16", steps=5),
}
GRID_2X2X2 = _case("tensor", "1f1b", 2, 2, zero=1, tensor=2)


def _world(case: dict) -> int:
    topo = case["cfg"]["topology"]
    return topo["pipe"] * topo["data"] * topo["tensor"]


def _batches(step: int, dynamic: bool) -> list:
    """The global batch of ``step``; with ``dynamic`` every micro-batch has its own sequence length."""
    if dynamic:
        return [gpt_batches(1, seq_len=4 + (step + k) % 3, seed=50 * step + k)[0] for k in range(GLOBAL)]
    return global_batches(step, 1, GLOBAL)


def _mine(batches: list, engine: pg.PipelineEngine) -> list:
    m, d = engine.config.schedule.micro_batches, engine.groups.coord.data
    return batches[d * m:(d + 1) * m]


def _fit(engine: pg.PipelineEngine, case: dict) -> list[float]:
    return [engine.train_batch(iter(_mine(_batches(s, case["dynamic"]), engine))) for s in range(case["steps"])]


# ---- on every rank ---------------------------------------------------------------------

def _train(case: dict, _directory: str) -> dict:
    cfg = case["cfg"]
    model = TinyGPT(N_LAYER, topology=pg.Topology(**cfg["topology"]), virtual_stages=cfg["schedule"]["virtual_stages"],
                    activation_checkpoint_interval=case["recompute"])
    engine = pg.initialize(model, cfg)
    result = {"losses": _fit(engine, case), "state": canonical_state(engine.module), "skipped": engine.skipped_steps,
              "data_rank": engine.groups.coord.data}
    if case["evaluate"]:
        result["eval"] = engine.eval_batch(iter(_mine(EVAL, engine)), return_outputs=True)
    return result


def _tensor(case: dict, _directory: str) -> dict:
    cfg = case["cfg"]
    groups = pg.init_distributed(cfg)
    model = GPT(GPT_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                virtual_stages=cfg["schedule"]["virtual_stages"])
    engine = pg.initialize(model, cfg, groups=groups)
    losses = _fit(engine, case)
    return {"losses": losses, "state": sharded_state(engine.module), "coord": tuple(groups.coord)}


def _run_cases(cases: dict[str, dict], directory: str) -> dict[str, dict]:
    runners = {"train": _train, "tensor": _tensor}
    return {name: runners[case["kind"]](case, os.path.join(directory, name)) for name, case in cases.items()}


# ---- in the test process -------------------------------------------------------------------

def _reference(case: dict, model: torch.nn.Module | None = None, dtype=torch.float32) -> dict:
    model = model if model is not None else PlainTinyGPT(N_LAYER)
    cfg = case["cfg"]
    steps = [_batches(s, case["dynamic"]) for s in range(case["steps"])]
    result = train(model, steps, cfg["optimizer"], cfg["train"]["grad_clip"], dtype=dtype)
    if case["evaluate"]:
        result["eval"] = evaluate(model, EVAL)
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case's per-rank results, the cases of one world size in one run_local call."""
    directory = str(tmp_path_factory.mktemp("vs_reference"))
    out: dict[str, list[dict]] = {}
    for world in sorted({_world(case) for case in CASES.values()}):
        cases = {name: case for name, case in CASES.items() if _world(case) == world}
        per_rank = run_local(_run_cases, world, (cases, directory), timeout_s=400)
        out.update({name: [rank[name] for rank in per_rank] for name in cases})
    return out


def _assert_eval(per_rank: list[dict], reference: dict, data: int) -> None:
    want_loss, want_outputs = reference["eval"]
    m = GLOBAL // data
    holders = 0
    for rank, result in enumerate(per_rank):
        loss, outputs = result["eval"]
        assert loss == pytest.approx(want_loss, rel=1e-5), f"rank {rank} eval loss"
        if outputs is not None:  # the last stage of a data replica
            holders += 1
            d = result["data_rank"]
            assert len(outputs) == m
            for got, want in zip(outputs, want_outputs[d * m:(d + 1) * m]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda e: f"rank {rank} outputs: {e}")
    assert holders == data, f"{holders} ranks returned outputs, expected one per data replica ({data})"


@pytest.mark.parametrize("name", ["zero1-gpipe", "zero1-interleaved_1f1b", "zero1-zb_h1", "zero1-1f1b-1x2-adam",
                                  "zero1-1f1b-1x2-sgd", "zero1-1f1b-2x2-adam", "zero1-1f1b-2x2-sgd", "eval-1f1b",
                                  "eval-gpipe-data1", "eval-1f1b-data1", "eval-interleaved_1f1b-data1",
                                  "eval-zb_h1-data1", "dynamic-shapes", "recompute-zb_h1"])
def test_training_and_evaluation_match_the_reference(results, name):
    case = CASES[name]
    reference = _reference(case)
    assert_matches_reference(results[name], reference, rtol=1e-5, atol=1e-6)
    if case["evaluate"]:
        _assert_eval(results[name], reference, case["cfg"]["topology"]["data"])


def test_clipping_bites_and_matches(results):
    case = CASES["clip-bites"]
    reference = _reference(case)
    assert min(reference["norms"]) > case["cfg"]["train"]["grad_clip"], reference["norms"]  # every step clips
    assert_matches_reference(results["clip-bites"], reference, rtol=1e-5, atol=1e-6)
    unclipped = _reference({**case, "cfg": {**case["cfg"], "train": {"grad_clip": 0.0}}})
    name, value = next(iter(unclipped["state"].items()))
    assert not torch.allclose(value, reference["state"][name], rtol=1e-3), "clipping changed nothing"


@pytest.mark.parametrize("name", ["tensor2-gpipe", "tensor2-interleaved_1f1b", "tensor2-zb_h1",
                                  *(f"tensor2-1f1b-{p}x{d}x{z}-clip{clip}" for p, d, z in TENSOR_LAYOUTS
                                    for clip in (0.0, TENSOR_CLIP))])
def test_tensor_parallel_matches_the_dense_reference(results, name):
    reference = _reference(CASES[name], PlainGPT(GPT_CFG))
    if name.endswith(f"-clip{TENSOR_CLIP}"):
        assert min(reference["norms"]) > TENSOR_CLIP, reference["norms"]  # every step clips
    assert_matches_dense(results[name], reference)


@pytest.mark.slow
def test_pipe_data_tensor_2x2x2_matches_the_dense_reference(tmp_path):
    per_rank = run_local(_tensor, 8, (GRID_2X2X2, str(tmp_path)), timeout_s=300)
    assert_matches_dense(per_rank, _reference(GRID_2X2X2, PlainGPT(GPT_CFG)))


# bf16 / fp16: gradients accumulate in fp32 (each micro-batch's 16-bit gradient is added
# into an fp32 buffer), so the layouts, which add the micro-batches and a tied layer's two
# halves in different orders, differ only by fp32 rounding before the fp32 master step:
# bf16 runs come out identical at every layout, fp16 within one fp16 rounding step of a
# parameter. (Summed in 16 bits they differed by 2.0e-3 in bf16 parameters.) Against
# float32 (plain torch), measured: bf16 losses 4.2e-3, parameters 7.1e-3; fp16 losses
# 4.6e-4, parameters 1.5e-3; those tolerances leave 3-4x that.
LOW_PRECISION = {"bfloat16": {"loss": 0.0, "params": 0.0, "params_rtol": 0.0,
                              "float32_loss": 1.5e-2, "float32_params": 2.5e-2},
                 "float16": {"loss": 0.0, "params": 0.0, "params_rtol": 2.0 ** -10,
                             "float32_loss": 2e-3, "float32_params": 5e-3}}


def _whole_state(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    return {k: v.float() for r in per_rank for k, v in r["state"].items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_agrees_across_layouts_and_with_float32(results, dtype):
    tol = LOW_PRECISION[dtype]
    runs = {layout: results[f"{dtype}-{'x'.join(map(str, layout))}"] for layout in LOW_PRECISION_LAYOUTS}
    base_losses, base_state = runs[(1, 1, 0)][0]["losses"], _whole_state(runs[(1, 1, 0)])
    for layout, per_rank in runs.items():
        assert all(r["skipped"] == 0 for r in per_rank), f"{dtype} {layout} skipped a step"
        state = _whole_state(per_rank)
        assert state.keys() == base_state.keys()
        for rank, result in enumerate(per_rank):
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(base_losses), rtol=tol["loss"],
                                       atol=0.0, msg=lambda e: f"{dtype} {layout} rank {rank} losses: {e}")
        for name, value in state.items():
            torch.testing.assert_close(value, base_state[name], rtol=tol["params_rtol"], atol=tol["params"],
                                       msg=lambda e: f"{dtype} {layout} {name}: {e}")
    reference = _reference(CASES[f"{dtype}-1x1x0"])
    torch.testing.assert_close(torch.tensor(base_losses), torch.tensor(reference["losses"]),
                               rtol=tol["float32_loss"], atol=0.0)
    for name, value in base_state.items():
        torch.testing.assert_close(value, reference["state"][name], rtol=0.0, atol=tol["float32_params"],
                                   msg=lambda e: f"{dtype} vs float32 {name}: {e}")


def test_bf16_tracks_float32_over_five_steps(results):
    # bf16 keeps 8 significand bits (relative rounding 2^-9 ~ 0.2% per op); through a few
    # layers and 5 SGD steps on fp32 master weights the mean loss stays within ~2%.
    reference = _reference(CASES["bfloat16-2x1x0-5-steps"])
    for rank, result in enumerate(results["bfloat16-2x1x0-5-steps"]):
        assert result["skipped"] == 0, f"rank {rank} skipped a step"
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=2e-2,
                                   atol=0.0, msg=lambda e: f"rank {rank} bf16 losses vs float32: {e}")
