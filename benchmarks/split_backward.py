"""What zero-bubble's split backward costs: one plain backward against its input half (I)
and weight half (W) on a stack of ``Linear + LayerNorm + GELU`` layers, float32, one thread.

I + W do the same matmuls as one backward (tests/unit/test_split_backward.py checks the
FLOP counts); the difference measured here is the price of two autograd calls and of
planning the split. Best of ``--repeats`` after 3 warm-up rounds, per row.

    python benchmarks/split_backward.py [--repeats 10] [--out benchmarks/results/split_backward.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.record import write_record  # noqa: E402
from pipegrid.pipe.split_backward import backward_input, backward_weight  # noqa: E402

SHAPES = [(8, 64, 16), (8, 512, 16)]  # (layers, hidden, batch)
WARMUP = 3


def stack(layers: int, hidden: int) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU())
                           for _ in range(layers)])


def measure(layers: int, hidden: int, batch: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` milliseconds of the full backward, I, W and I + W."""
    torch.manual_seed(0)
    stage = stack(layers, hidden)
    params = list(stage.parameters())
    full, first, second = [], [], []
    for _ in range(WARMUP + repeats):
        x = torch.randn(batch, hidden, requires_grad=True)
        out = stage(x)
        start = time.perf_counter()
        out.backward(torch.ones_like(out))
        full.append(time.perf_counter() - start)
        x = torch.randn(batch, hidden, requires_grad=True)
        out = stage(x)
        start = time.perf_counter()
        _, state = backward_input([out], [torch.ones_like(out)], [x], params)
        middle = time.perf_counter()
        backward_weight(state)
        first.append(middle - start)
        second.append(time.perf_counter() - middle)
    best = {name: min(times[WARMUP:]) * 1e3 for name, times in (("full_ms", full), ("input_ms", first),
                                                                ("weight_ms", second))}
    sums = [a + b for a, b in zip(first[WARMUP:], second[WARMUP:])]
    return {**best, "input_plus_weight_ms": min(sums) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/split_backward.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [{"layers": n, "hidden": h, "batch": b, **measure(n, h, b, args.repeats)} for n, h, b in SHAPES]
    table = ["| layers x hidden, batch | full backward (ms) | I (ms) | W (ms) | I + W (ms) | I + W / full |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['layers']} x {r['hidden']}, {r['batch']} | {r['full_ms']:.2f} | {r['input_ms']:.2f} | "
              f"{r['weight_ms']:.2f} | {r['input_plus_weight_ms']:.2f} | "
              f"{r['input_plus_weight_ms'] / r['full_ms']:.2f} |" for r in rows]
    print("\n".join(table))
    write_record(args.out, rows, table, threads=1, repeats=args.repeats)


if __name__ == "__main__":
    main()
