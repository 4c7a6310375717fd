"""Step time of the ZeRO stages side by side in one run, pipe=2 x data=2 on gloo, on a
compute-bound residual MLP (h=512, 8 blocks, 256-row micro-batches, 1F1B, 4 micro-batches).

Each layout trains WARMUP steps, then the median of STEPS timed steps is kept; layouts take
turns round by round so that a slower period of a shared machine hits them alike.

    python benchmarks/zero_time.py [--out benchmarks/results/zero_time.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402

from benchmarks.memory import Block  # noqa: E402
from benchmarks.record import write_record  # noqa: E402

HIDDEN, BLOCKS, ROWS, MICRO_BATCHES = 512, 8, 256, 4
WARMUP, STEPS, ROUNDS = 2, 4, 5
LAYOUTS = {"zero 1": {"stage": 1}, "zero 2": {"stage": 2},
           "zero 2 per micro-batch": {"stage": 2, "reduce_every_micro_batch": True}, "zero 3": {"stage": 3},
           "zero 3 per layer": {"stage": 3, "gather": "per_layer"}}


def _engine(zero: dict) -> pg.PipelineEngine:
    model = pg.PipelineModule([pg.LayerSpec(Block, HIDDEN) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=pg.Topology(pipe=2, data=2))
    return pg.initialize(model, {"topology": {"pipe": 2, "data": 2}, "zero": zero,
                                 "schedule": {"name": "1f1b", "micro_batches": MICRO_BATCHES},
                                 "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4}})


def _times() -> dict[str, list[float]]:
    engines = {name: _engine(zero) for name, zero in LAYOUTS.items()}
    x = torch.randn(ROWS, HIDDEN)
    batch = [(x, x)] * MICRO_BATCHES
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for engine in engines.values():
        for _ in range(WARMUP):
            engine.train_batch(iter(batch))
    for _ in range(ROUNDS):
        for name, engine in engines.items():
            for _ in range(STEPS):
                start = time.perf_counter()
                engine.train_batch(iter(batch))
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/zero_time.json")
    args = parser.parse_args()
    per_rank = run_local(_times, 4, (), timeout_s=900)
    base = statistics.median(max(r["zero 1"][i] for r in per_rank) for i in range(ROUNDS * STEPS))
    rows, lines = [], ["| layout | median step s | vs zero 1 |", "|---|---|---|"]
    for name in LAYOUTS:
        # a step lasts as long as its slowest rank
        median = statistics.median(max(r[name][i] for r in per_rank) for i in range(ROUNDS * STEPS))
        rows.append({"layout": name, "median_step_s": median, "vs_zero1": median / base})
        lines.append(f"| {name} | {median:.4f} | {median / base:.3f} |")
    print("\n".join(lines))
    write_record(args.out, rows, lines, hidden=HIDDEN, blocks=BLOCKS, rows_per_micro_batch=ROWS,
                 micro_batches=MICRO_BATCHES, pipe=2, data=2, schedule="1f1b")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
