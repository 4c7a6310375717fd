"""precision.fp8 through the engine, on the CPU with torchao's float8 emulation: the same
losses and parameters at pipe 2 as at pipe 1, tracking plain float32 torch, and really in float8."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import run_local
from tests.support.models import mlp_batches, mlp_layers, mse_loss

pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'pipegrid[fp8]')")

WIDTH, OUT, DEPTH, STEPS, MICRO_BATCHES = 32, 16, 2, 4, 4
SGD = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}


def _batches(step: int) -> list:
    return mlp_batches(MICRO_BATCHES, micro_batch_size=8, width=WIDTH, out=OUT, seed=step)


def _config(pipe: int, fp8: bool) -> dict:
    return {"topology": {"pipe": pipe}, "schedule": {"name": "1f1b", "micro_batches": MICRO_BATCHES},
            "optimizer": SGD, "comm": {"timeout_s": 60, "backend": "gloo"},  # the CPU, on a GPU host too
            "precision": {"dtype": "bfloat16", "fp8": fp8, "fp8_emulate": fp8}}


def _train(pipe: int, fp8: bool) -> dict:
    module = pg.PipelineModule(mlp_layers(DEPTH, WIDTH, OUT), loss_fn=mse_loss, topology=pg.Topology(pipe=pipe))
    engine = pg.initialize(module, _config(pipe, fp8))
    float8 = sorted(name for name, m in engine.module.named_modules() if type(m).__name__ == "Float8Linear")
    losses = [engine.train_batch(iter(_batches(step))) for step in range(STEPS)]
    return {"losses": losses, "float8": float8, "rank": dist.get_rank(),
            "state": {n: p.detach().float() for n, p in engine.module.named_parameters()}}


def _reference() -> list[float]:
    """Plain torch, float32, no float8: one process, gradient accumulation."""
    model = pg.build_reference(mlp_layers(DEPTH, WIDTH, OUT), loss_fn=mse_loss)
    optimizer = torch.optim.SGD(model.parameters(), **{k: v for k, v in SGD.items() if k != "_target_"})
    losses = []
    for step in range(STEPS):
        batches, total = _batches(step), 0.0
        for x, y in batches:
            loss = mse_loss(model(x), y)
            (loss / len(batches)).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / len(batches))
    return losses


def _state(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^stages\.\d+\.", "", k): v for r in per_rank for k, v in r["state"].items()}


def test_fp8_trains_alike_at_pipe_2_and_pipe_1_and_tracks_float32():
    two = run_local(_train, 2, (2, True), backend=None, timeout_s=120)
    one = run_local(_train, 1, (1, True), backend=None, timeout_s=120)[0]
    bf16 = run_local(_train, 1, (1, False), backend=None, timeout_s=120)[0]
    # every Linear: in (32->32), fc1/fc2 of both blocks (32<->64), out (32->16); all multiples of 16
    assert len(one["float8"]) == 6 and sum(len(r["float8"]) for r in two) == 6
    for result in two:  # bf16 with fp32 gradient accumulation: identical at every layout
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(one["losses"]), rtol=0, atol=0)
    whole = _state(two)
    assert whole.keys() == _state([one]).keys()
    for name, value in _state([one]).items():
        torch.testing.assert_close(whole[name], value, rtol=0, atol=0, msg=lambda e, name=name: f"{name}: {e}")
    assert one["losses"] != bf16["losses"]  # the matmuls really ran in float8
    # e4m3 forward / e5m2 gradients against float32 over 4 steps: measured 0.28% (bf16 alone 0.24%)
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(_reference()), rtol=2e-2, atol=0)
