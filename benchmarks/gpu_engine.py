"""The engine on one device (pipe=1): same training as plain torch, and what it costs per step.

Correctness: an 8-block residual MLP ``x + fc2(relu(fc1(x)))`` trained for a few steps
by pipegrid (fp32, bf16 with fp32 master weights, each with ZeRO-1 on and off) against
the same model trained by a plain torch loop on the CPU in float32 (layer i built under
``torch.manual_seed(seed + i)``, gradient accumulation, the same AdamW). fp32 must agree
to 1e-4 relative (CUDA's kernels add in another order than the CPU's); bf16 is reported
against fp32 with its error. Overhead: ms per step of ``engine.train_batch`` against a
plain loop doing the same work on the same device (tiny width, so the host's per-step
work dominates), in alternating rounds, medians.

    python benchmarks/gpu_engine.py --device cuda --out benchmarks/results/engine_cuda.json
    python benchmarks/gpu_engine.py --device cpu --quick        # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipegrid as pg  # noqa: E402

BLOCKS, SEED = 8, 1234
ADAMW = {"lr": 1e-3, "weight_decay": 0.01}


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, H)
        return x + self.fc2(torch.relu(self.fc1(x)))


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output.float(), target.float())


def _batches(hidden: int, micro_batch: int, micro_batches: int, step: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(micro_batch, hidden, generator=gen), torch.randn(micro_batch, hidden, generator=gen))
            for _ in range(micro_batches)]


def reference(hidden: int, micro_batch: int, micro_batches: int, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """Plain torch on the CPU in float32: layer i from seed + i, gradient accumulation."""
    blocks = []
    for i in range(BLOCKS):
        torch.manual_seed(SEED + i)
        blocks.append(Block(hidden))
    model = nn.Sequential(*blocks)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for step in range(steps):
        batch = _batches(hidden, micro_batch, micro_batches, step)
        total = 0.0
        for x, y in batch:
            loss = _mse(model(x), y)
            (loss / len(batch)).backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / len(batch))
    return losses, [p.detach().clone() for p in model.parameters()]


def engine_run(hidden: int, micro_batch: int, micro_batches: int, steps: int, dtype: str, zero: int,
               backend: str) -> tuple[list[float], list[torch.Tensor], pg.PipelineEngine]:
    module = pg.PipelineModule([pg.LayerSpec(Block, hidden) for _ in range(BLOCKS)], loss_fn=_mse,
                               topology=pg.Topology(pipe=1), seed=SEED)
    config = {"topology": {"pipe": 1}, "schedule": {"name": "1f1b", "micro_batches": micro_batches},
              "optimizer": {"_target_": "torch.optim.AdamW", **ADAMW}, "zero": {"stage": zero},
              "precision": {"dtype": dtype}, "comm": {"backend": backend}}
    engine = pg.initialize(module, config)
    losses = [engine.train_batch(iter(_batches(hidden, micro_batch, micro_batches, step))) for step in range(steps)]
    return losses, [p.detach().float().cpu() for p in engine.params], engine


def correctness(args: argparse.Namespace, backend: str) -> list[dict]:
    hidden, mb, m, steps = 32, 8, 4, 4
    ref_losses, ref_params = reference(hidden, mb, m, steps)
    rows = []
    for dtype in ("float32", "bfloat16"):
        for zero in (0, 1):
            losses, params, _ = engine_run(hidden, mb, m, steps, dtype, zero, backend)
            loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
            param_err = max(float(((p - r).abs().max() / r.abs().max()).item()) for p, r in zip(params, ref_params))
            bound = 1e-4 if dtype == "float32" else 5e-2
            rows.append({"dtype": dtype, "zero": zero, "loss_rel_err": loss_err, "param_rel_err": param_err,
                         "bound": bound, "ok": loss_err <= bound and param_err <= bound * 10})
    return rows


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, batch: list, device: torch.device) -> float:
    total = torch.zeros((), device=device)
    for x, y in batch:
        loss = _mse(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        (loss / len(batch)).backward()
        total += loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (total / len(batch)).item()  # a loss on the host, as train_batch returns


def overhead(args: argparse.Namespace, device: torch.device, backend: str) -> dict:
    """ms/step of train_batch against a plain loop, both on ``device``, alternating rounds."""
    hidden, mb, m = 64, 4, 8
    steps, rounds = (5, 3) if args.quick else (50, 5)
    torch.manual_seed(SEED)
    model = nn.Sequential(*[Block(hidden) for _ in range(BLOCKS)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **ADAMW)
    _, _, engine = engine_run(hidden, mb, m, 1, "float32", 0, backend)
    batches = [_batches(hidden, mb, m, s) for s in range(steps)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"plain": [], "engine": []}
    for _ in range(rounds):
        for name, step in (("plain", lambda b: _plain_step(model, opt, b, device)),
                           ("engine", lambda b: engine.train_batch(iter(b)))):
            step(batches[0])  # warm
            sync()
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            sync()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    plain, eng = statistics.median(times["plain"]), statistics.median(times["engine"])
    return {"plain_ms": plain, "engine_ms": eng, "overhead_ms": eng - plain, "ratio": eng / plain,
            "micro_batches": m, "rounds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        rows = correctness(args, backend)
        cost = overhead(args, device, backend)
    finally:  # pipegrid leaves an NCCL group to its owner at exit: this script owns it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print("| dtype | zero.stage | max loss rel. error | max param rel. error | ok |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['zero']} | {r['loss_rel_err']:.2e} | {r['param_rel_err']:.2e} | {r['ok']} |")
    print(f"\nper step ({cost['micro_batches']} micro-batches): plain loop {cost['plain_ms']:.2f} ms, "
          f"engine {cost['engine_ms']:.2f} ms, overhead {cost['overhead_ms']:.2f} ms ({cost['ratio']:.2f}x)")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "correctness": rows, "overhead": cost}
    out = args.out or Path(__file__).parent / "results" / f"engine_{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
