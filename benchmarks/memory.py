"""Bytes per rank from ``engine.memory_report()`` for data = 1, 2, 4, ZeRO off and on: the
tensor storages the training state allocates, each counted once.

The model is a 16-block residual MLP (h=256, ~4.2M parameters) with Adam, pipe=1, so
each data rank holds the whole model and the optimizer state is what ZeRO-1 divides.

    python benchmarks/memory.py [--out benchmarks/results/memory.json]
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


def _report(data: int, zero: int, dtype: str) -> dict[str, int]:
    model = pg.PipelineModule([pg.LayerSpec(Block, HIDDEN) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=pg.Topology(data=data))
    engine = pg.initialize(model, {"topology": {"data": data}, "zero": {"stage": zero},
                                   "precision": {"dtype": dtype}, "schedule": {"micro_batches": 1},
                                   "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4}})
    x = torch.randn(4, HIDDEN)
    engine.train_batch(iter([(x, x)]))  # optimizer state exists after the first step
    return engine.memory_report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
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
