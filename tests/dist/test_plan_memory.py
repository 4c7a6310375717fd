"""``engine.memory_report()`` counts the tensor storages the process really holds, and the
planner's memory prediction matches that report."""

import gc
import warnings

import pytest
import torch
from torch import nn

import pipegrid as pg
from pipegrid.launch import run_local
from pipegrid.plan.memory import OptimizerSpec, memory_report

WIDTH, DEPTH = 64, 6  # every tensor a multiple of 16 bytes: the engine's flat buffers add no alignment padding


def _live_storages() -> dict[int, int]:
    """Every tensor storage alive in this process, by address: a census, not the engine's books."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch.distributed aliases
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _measured(data, zero, dtype, optimizer):
    before = _live_storages()  # (a forked worker also holds whatever the test process held)
    layers = [pg.LayerSpec(nn.Linear, WIDTH, WIDTH) for _ in range(DEPTH)]
    model = pg.PipelineModule(layers, loss_fn=nn.functional.mse_loss, topology=pg.Topology(data=data))
    count = sum(p.numel() for p in model.parameters())  # (ZeRO-3 frees them after the step)
    engine = pg.initialize(model, {"topology": {"data": data}, "zero": {"stage": zero},
                                   "precision": {"dtype": dtype}, "schedule": {"micro_batches": 1},
                                   "optimizer": optimizer})
    x = torch.randn(2, WIDTH)
    engine.train_batch(iter([(x, x)]))
    del x
    new = sum(size for address, size in _live_storages().items() if address not in before)
    return engine.memory_report(), new, count


ADAM = ("adam", {"_target_": "torch.optim.Adam", "lr": 1e-3})
SGD = ("sgd_momentum", {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9})
CASES = [(dtype, data, zero, ADAM) for dtype in ("float32", "bfloat16") for data, zero in ((1, 0), (2, 1), (4, 1))]
CASES += [("float32", 2, 0, SGD), ("bfloat16", 2, 1, SGD), ("bfloat16", 2, 0, ADAM)]
CASES += [("float32", 4, 2, ADAM), ("bfloat16", 4, 2, ADAM), ("bfloat16", 2, 2, SGD)]  # ZeRO-2
CASES += [("float32", 4, 3, ADAM), ("bfloat16", 2, 3, ADAM)]  # ZeRO-3


def _run_all(cases):
    return [_measured(data, zero, dtype, optimizer) for dtype, data, zero, (_, optimizer) in cases]


@pytest.fixture(scope="module")
def measured():
    """Every case at its data degree; one run_local call per degree."""
    results = {}
    for data in sorted({case[1] for case in CASES}):
        indices = [i for i, case in enumerate(CASES) if case[1] == data]
        reports = run_local(_run_all, data, ([CASES[i] for i in indices],), timeout_s=60)[0]  # data rank 0
        results.update(zip(indices, reports))
    return results


IDS = [f"{dtype}-data{data}-zero{zero}-{opt[0]}" for dtype, data, zero, opt in CASES]


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_memory_report_accounts_for_every_live_tensor(measured, index):
    case, (report, live, _) = CASES[index], measured[index]
    dtype, zero = case[0], case[2]
    # without ZeRO the step's gradients (and the master copy's) are freed after it:
    # the report counts them, the census after the step does not
    # (ZeRO-2's gradient shard too: it is made by the step's reduction and freed with its gradients)
    between_steps = report["total"] - (report["gradients"] + report["buffers"] if zero in (0, 2, 3) else 0)
    assert live == between_steps, (report, live)
    # 16-bit training accumulates its gradients in fp32: twice the parameters' bytes (ZeRO-2: a shard)
    shards = case[1] if zero >= 2 else 1
    parameters = report["master_weights"] * case[1] // (2 if dtype == "bfloat16" else 1) if zero == 3 \
        else report["parameters"]  # ZeRO-3 frees them: the master shard is what is left
    assert report["gradients"] * shards == parameters * (2 if dtype == "bfloat16" else 1) > 0


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_memory_prediction_matches_the_engine(measured, index):
    (dtype, data, zero, (name, _)), (report, _, parameters) = CASES[index], measured[index]
    predicted = memory_report(parameters, OptimizerSpec(name, dtype), data=data, zero=zero)
    for key in ("parameters", "gradients", "master_weights", "buffers"):
        assert predicted[key] == report[key], (key, predicted, report)
    # Adam's step counters (4 bytes per optimizer tensor: 2 x DEPTH without ZeRO, 1 shard with it)
    # are the planner's only omission
    counters = (4 * 2 * DEPTH if zero == 0 else 4) if name == "adam" else 0
    assert report["optimizer"] - predicted["optimizer"] == counters, (predicted, report)


BUCKET = WIDTH * WIDTH + WIDTH  # one Linear's elements: a bucket's fill is one parameter pair's gradients
BUCKETED_DEPTH = 16  # a shard of 8 buckets: 3 alive is well under the full buffer of 16


def _bucketed(data, bucket):
    """ZeRO-2 bucket by bucket: the report (its gradient shard) and the most gradient bytes the
    backwards held beside the shard (``step_gradient_bytes``)."""
    layers = [pg.LayerSpec(nn.Linear, WIDTH, WIDTH) for _ in range(BUCKETED_DEPTH)]
    model = pg.PipelineModule(layers, loss_fn=nn.functional.mse_loss, topology=pg.Topology(data=data))
    count = sum(p.numel() for p in model.parameters())
    engine = pg.initialize(model, {"topology": {"data": data}, "schedule": {"micro_batches": 2},
                                   "zero": {"stage": 2, "reduce_every_micro_batch": True, "bucket_elements": bucket},
                                   "optimizer": ADAM[1]})
    x = torch.randn(4, WIDTH)
    engine.train_batch(iter([(x[:2], x[:2]), (x[2:], x[2:])]))
    return engine.memory_report(), engine.zero.step_gradient_bytes, count


def test_bucketed_zero2_prediction_bounds_what_the_backwards_held():
    report, beside_shard, parameters = run_local(_bucketed, 2, (2, BUCKET), timeout_s=60)[0]
    predicted = memory_report(parameters, OptimizerSpec(*ADAM[:1]), data=2, zero=2, bucket_elements=BUCKET)
    assert predicted["gradients"] == report["gradients"]  # the shard
    held = report["gradients"] + beside_shard
    # the prediction is the shard and 3 buckets (one filling, two reducing); the engine held no more,
    # and at least the shard and one bucket, so the prediction is within 2 buckets of it
    assert predicted["step_gradients"] - 2 * BUCKET * 4 <= held <= predicted["step_gradients"], (held, predicted)
    full = memory_report(parameters, OptimizerSpec(*ADAM[:1]), data=2, zero=2)["step_gradients"]
    assert held < full
