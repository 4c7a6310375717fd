"""Bytes per rank from ``engine.memory_report()`` for data = 1, 2, 4, ZeRO off and on: the
tensor storages the training state allocates, each counted once.

The model is a 16-block residual MLP (h=256, ~4.2M parameters) with Adam, pipe=1, so
each data rank holds the whole model and the optimizer state is what ZeRO-1 divides.
``--stages`` instead compares the ZeRO stages side by side at pipe=2, data=4 (8 processes),
with the gradient and parameter bytes the step held at its peak (ZeRO-2 frees its full-size
gradient buffer before the optimizer step, ZeRO-3 its parameters after it, or each layer after
each use with ``zero.gather=per_layer``; the report after the step shows what stays).

    python benchmarks/memory.py [--out benchmarks/results/memory.json]
    python benchmarks/memory.py --stages [--out benchmarks/results/memory_zero_stages.json]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402

from benchmarks.record import write_record  # noqa: E402

HIDDEN, BLOCKS = 256, 16
KEYS = ("parameters", "gradients", "optimizer", "master_weights", "buffers", "total")


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _report(data: int, zero: int | dict, dtype: str, pipe: int = 1) -> dict[str, int]:
    zero = zero if isinstance(zero, dict) else {"stage": zero}
    model = pg.PipelineModule([pg.LayerSpec(Block, HIDDEN) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=pg.Topology(pipe=pipe, data=data))
    micro_batches = 2 * pipe - 1
    engine = pg.initialize(model, {"topology": {"pipe": pipe, "data": data}, "zero": zero,
                                   "precision": {"dtype": dtype}, "schedule": {"micro_batches": micro_batches},
                                   "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4}})
    x = torch.randn(4, HIDDEN)
    engine.train_batch(iter([(x, x)] * micro_batches))  # optimizer state exists after the first step
    seen = [0]  # gradient bytes alive while a forward runs (with the activations it adds)
    for block in (m for m in model.modules() if isinstance(m, Block)):
        block.register_forward_pre_hook(lambda *_: seen.__setitem__(0, max(seen[0], _gradient_bytes(engine))))
    engine.train_batch(iter([(x, x)] * micro_batches))
    report = engine.memory_report()
    # the full-size gradient buffer a step holds during its backwards (ZeRO-0/1: all the time)
    report["step_gradients"] = getattr(engine.zero, "step_gradient_bytes", report["gradients"])
    report["forward_gradients"] = seen[0]
    # the most parameter bytes the step held at once (ZeRO-3 frees them after its optimizer step;
    # zero.gather=per_layer holds a layer or two at a time)
    report["step_parameters"] = getattr(engine.zero, "peak_parameter_bytes", report["parameters"])
    return report


def _gradient_bytes(engine: pg.PipelineEngine) -> int:
    """Gradient bytes held now (ZeRO-0 reports its step's, which last from the first backward on)."""
    return engine.zero.memory()["gradients"]


STAGES = {"0": {"stage": 0}, "1": {"stage": 1}, "2": {"stage": 2},
          "2 per micro-batch": {"stage": 2, "reduce_every_micro_batch": True}, "3": {"stage": 3},
          "3 per layer": {"stage": 3, "gather": "per_layer"}}
STAGE_KEYS = ("parameters", "step_parameters", "gradients", "step_gradients", "forward_gradients", "optimizer",
              "master_weights", "buffers", "total")


def _stages(out: str) -> None:
    """The ZeRO stages side by side at pipe=2, data=4; pipe rank 0's bytes (both ranks hold 8 blocks)."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        for name, zero in STAGES.items():
            report = run_local(_report, 8, (4, zero, dtype, 2), timeout_s=300)[0]
            rows.append({"dtype": dtype, "zero": name, "pipe": 2, "data": 4, **report})
    header = "| dtype | zero | " + " | ".join(f"{k} MiB" for k in STAGE_KEYS) + " |"
    lines = [header, "|" + "---|" * (2 + len(STAGE_KEYS))]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['zero']} | " + " | ".join(f"{r[k] / 2**20:.2f}" for k in STAGE_KEYS) + " |")
    print("\n".join(lines))
    write_record(out, rows, lines, hidden=HIDDEN, blocks=BLOCKS, pipe=2, data=4)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--stages", action="store_true", help="ZeRO stages side by side at pipe=2, data=4")
    args = parser.parse_args()
    if args.stages:
        _stages(args.out or "benchmarks/results/memory_zero_stages.json")
        return
    args.out = args.out or "benchmarks/results/memory.json"
    rows = []
    for dtype in ("float32", "bfloat16"):
        for zero in (0, 1):
            for data in (1, 2, 4):
                report = run_local(_report, data, (data, zero, dtype), timeout_s=120)[0]
                rows.append({"dtype": dtype, "zero": zero, "data": data, **report})
    header = "| dtype | zero.stage | data | " + " | ".join(f"{k} MiB" for k in KEYS) + " |"
    lines = [header, "|" + "---|" * (3 + len(KEYS))]
    for r in rows:
        cells = " | ".join(f"{r[k] / 2**20:.2f}" for k in KEYS)
        lines.append(f"| {r['dtype']} | {r['zero']} | {r['data']} | {cells} |")
    print("\n".join(lines))
    write_record(args.out, rows, lines, hidden=HIDDEN, blocks=BLOCKS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
