"""Bytes per rank from ``engine.memory_report()`` for data = 1, 2, 4, ZeRO off and on: the
tensor storages the training state allocates, each counted once.

The model is a 16-block residual MLP (h=256, ~4.2M parameters) with Adam, pipe=1, so
each data rank holds the whole model and the optimizer state is what ZeRO-1 divides.
``--stages`` instead compares the ZeRO stages side by side at pipe=2, data=4 (8 processes),
with the gradient and parameter bytes the step held at its peak (ZeRO-2 frees its full-size
gradient buffer before the optimizer step, ZeRO-3 its parameters after it, or each layer after
each use with ``zero.gather=per_layer``; the report after the step shows what stays).

``--buckets`` puts ZeRO-2/3's gradient reduction once per step (full-size fp32 buffer during the
backwards) beside ``zero.reduce_every_micro_batch`` (buckets of ``zero.bucket_elements`` reduced
as backward runs) on the example GPT at pipe=1, data=2: each data rank's gradient shard and the
most gradient bytes it held beside it during the step.

    python benchmarks/memory.py [--out benchmarks/results/memory.json]
    python benchmarks/memory.py --stages [--out benchmarks/results/memory_zero_stages.json]
    python benchmarks/memory.py --buckets [--out benchmarks/results/memory_zero_buckets.json]
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


GPT_SHAPE = {"vocab_size": 8192, "seq_len": 128, "n_layer": 4, "n_head": 4, "n_embd": 256}  # 5.3M parameters
BUCKET_LAYOUTS = {"per step": {"reduce_every_micro_batch": False},
                  "per micro-batch, 2^24 (default)": {"reduce_every_micro_batch": True},
                  "per micro-batch, 2^18": {"reduce_every_micro_batch": True, "bucket_elements": 1 << 18},
                  "per micro-batch, 2^16": {"reduce_every_micro_batch": True, "bucket_elements": 1 << 16}}


def _gpt_report(zero: dict, dtype: str, schedule: str) -> dict[str, int]:
    """One data rank's gradient bytes after the second step of the example GPT (pipe=1, data=2)."""
    from examples.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**GPT_SHAPE), topology=pg.Topology(pipe=1, data=2))
    engine = pg.initialize(model, {"topology": {"pipe": 1, "data": 2}, "zero": zero, "precision": {"dtype": dtype},
                                   "schedule": {"name": schedule, "micro_batches": 4},
                                   "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4}})
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, GPT_SHAPE["vocab_size"], (4, GPT_SHAPE["seq_len"] + 1), generator=gen)
    batch = [(tokens[:, :-1], tokens[:, 1:])] * 4
    for _ in range(2):
        engine.train_batch(iter(batch))
    report = engine.memory_report()
    return {"gradients": report["gradients"], "step_gradients": engine.zero.step_gradient_bytes,
            "full_buffer": engine.zero.shard_size * 2 * 4}


def _buckets(out: str) -> None:
    rows = []
    for stage in (2, 3):
        for dtype, schedule in (("float32", "1f1b"), ("bfloat16", "zb_h1")):
            for name, zero in BUCKET_LAYOUTS.items():
                if stage == 3 and "2^16" in name:
                    continue
                per_rank = run_local(_gpt_report, 2, ({"stage": stage, **zero}, dtype, schedule), timeout_s=300)
                for data_rank, report in enumerate(per_rank):
                    rows.append({"zero": stage, "dtype": dtype, "schedule": schedule, "reduce": name,
                                 "data_rank": data_rank, **report})
    lines = ["| zero | dtype, schedule | reduce | data rank | gradient shard MiB | peak beside it MiB | "
             "full-size buffer MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['zero']} | {r['dtype']}, {r['schedule']} | {r['reduce']} | {r['data_rank']} | "
                     f"{r['gradients'] / 2**20:.2f} | {r['step_gradients'] / 2**20:.2f} | "
                     f"{r['full_buffer'] / 2**20:.2f} |")
    print("\n".join(lines))
    write_record(out, rows, lines, pipe=1, data=2, micro_batches=4, **GPT_SHAPE)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--stages", action="store_true", help="ZeRO stages side by side at pipe=2, data=4")
    parser.add_argument("--buckets", action="store_true",
                        help="ZeRO-2/3 gradient peak, once per step against bucket by bucket, GPT at data=2")
    args = parser.parse_args()
    if args.buckets:
        _buckets(args.out or "benchmarks/results/memory_zero_buckets.json")
        return
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
