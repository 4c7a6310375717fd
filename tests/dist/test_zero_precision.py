"""ZeRO-1 and mixed precision on gloo: 1/data of the optimizer state, and fp16 overflow
skipping the step everywhere. (ZeRO-1 training like one process, and bf16 and fp16 against
float32: tests/dist/test_vs_reference.py.)"""

import math

import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import run_local
from tests.support.engine_cases import N_LAYER, canonical_state, config, global_batches
from tests.support.models import TinyGPT

# eps well above float32 rounding noise: the key bias of attention has an exactly-zero
# gradient, and Adam would turn the last-bit noise of two reduction orders into
# full-size updates of random sign (1e-10 / 1e-8); with eps=1e-5 it stays ~1e-7.
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.2, "momentum": 0.9}


def _train(cfg, steps=5):
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(global_batches(s, topo.data, m)[d * m:(d + 1) * m])) for s in range(steps)]
    return {"losses": losses, "state": canonical_state(engine.module), "memory": engine.memory_report(),
            "scale": engine.scaler.scale, "skipped": engine.skipped_steps}


def test_optimizer_state_shrinks_with_the_data_degree():
    sizes = [p.numel() for p in TinyGPT(N_LAYER).parameters()]
    # the flat buffer starts every tensor on a 16-byte boundary (4 float32 elements)
    flat = sum(-(-n // 4) * 4 for n in sizes)
    for data in (1, 2, 4):
        cfg = config("1f1b", 1, data, 1, optimizer=ADAM, zero={"stage": 1})
        shard = -(-flat // data)
        for rank, result in enumerate(run_local(_train, data, (cfg, 1), timeout_s=60)):
            memory = result["memory"]
            assert memory["optimizer"] == 2 * 4 * shard + 4, (data, rank, memory)  # exp_avg, exp_avg_sq, step
            assert memory["parameters"] == memory["gradients"] == 4 * shard * data, (data, rank, memory)


def _fp16_overflow(cfg):
    topo = pg.Topology(**cfg["topology"])
    engine = pg.initialize(TinyGPT(N_LAYER, topology=topo), cfg)
    m = cfg["schedule"]["micro_batches"]
    engine.train_batch(iter(global_batches(0, 1, m)))
    before = canonical_state(engine.module)
    scale_before = engine.scaler.scale
    handle = None
    if dist.get_rank() == 0:  # poison one gradient on one rank only
        param = next(engine.module.parameters())
        handle = param.register_hook(lambda grad: grad * math.inf)
    loss = engine.train_batch(iter(global_batches(1, 1, m)))
    if handle is not None:
        handle.remove()
    after = canonical_state(engine.module)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    engine.train_batch(iter(global_batches(2, 1, m)))
    moved = any(not torch.equal(after[k], v) for k, v in canonical_state(engine.module).items())
    return {"unchanged": unchanged, "scale_before": scale_before, "scale_after": engine.scaler.scale,
            "skipped": engine.skipped_steps, "loss": loss, "moved_later": moved}


def test_fp16_overflow_skips_the_step_on_every_rank_and_halves_the_scale():
    cfg = config("1f1b", 2, 1, 2, dtype="float16", optimizer=SGD,
                 precision={"dtype": "float16", "initial_loss_scale": 1024.0, "growth_interval": 100})
    for result in run_local(_fp16_overflow, 2, (cfg,), timeout_s=60):
        assert result["unchanged"], "a skipped step changed parameters"
        assert result["scale_after"] == result["scale_before"] / 2 == 512.0
        assert result["skipped"] == 1 and result["moved_later"]
        assert math.isfinite(result["loss"])
