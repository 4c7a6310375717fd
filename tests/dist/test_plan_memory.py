"""The planner's memory prediction against what the engine really holds (within 10%)."""

import pytest
import torch
from torch import nn

import pipegrid as pg
from pipegrid.launch import run_local
from pipegrid.plan.memory import OptimizerSpec, memory_report

WIDTH, DEPTH = 64, 6


def _measured(data, zero, dtype, optimizer):
    layers = [pg.LayerSpec(nn.Linear, WIDTH, WIDTH) for _ in range(DEPTH)]
    model = pg.PipelineModule(layers, loss_fn=nn.functional.mse_loss, topology=pg.Topology(data=data))
    engine = pg.initialize(model, {"topology": {"data": data}, "zero": {"stage": zero},
                                   "precision": {"dtype": dtype}, "schedule": {"micro_batches": 1},
                                   "optimizer": optimizer})
    x = torch.randn(2, WIDTH)
    engine.train_batch(iter([(x, x)]))
    return engine.memory_report(), sum(p.numel() for p in model.parameters())


ADAM = ("adam", {"_target_": "torch.optim.Adam", "lr": 1e-3})
SGD = ("sgd_momentum", {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9})
CASES = [(dtype, data, zero, ADAM) for dtype in ("float32", "bfloat16") for data, zero in ((1, 0), (2, 1), (4, 1))]
CASES += [("float32", 2, 0, SGD), ("bfloat16", 2, 1, SGD)]


@pytest.mark.parametrize("dtype,data,zero,opt", CASES)
def test_memory_prediction_matches_the_engine(dtype, data, zero, opt):
    name, optimizer = opt
    measured, parameters = run_local(_measured, data, (data, zero, dtype, optimizer), timeout_s=60)[0]
    predicted = memory_report(parameters, OptimizerSpec(name, dtype), data=data, zero=bool(zero))
    assert predicted["total"] == pytest.approx(measured["total"], rel=0.10), (predicted, measured)
    for key in ("parameters", "gradients", "master_weights"):
        assert predicted[key] == pytest.approx(measured[key], rel=0.10, abs=1024), key
