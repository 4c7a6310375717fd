"""A transformers Llama against pipegrid's own GPT at the same width on the same 3-D grid
(pipe=2 x tensor=2, 4 CPU ranks over gloo): ms per training step, alternating rounds, medians.

Both have n_layer blocks of width ``hidden`` with ``heads`` heads, a tied embedding and head of
``vocab`` tokens and about the same MLP parameters (the GPT's 4h GELU MLP against Llama's
gated MLP of 8h/3, rounded to split over the tensor group). Each split projection costs an
all-reduce of its input gradient in backward (and a row-parallel one in forward): where the
time goes is in docs/hf_tensor_parallel.md.

    python benchmarks/hf_tp_speed.py [--rounds 3] [--out benchmarks/results/hf_tp_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/ on sys.path could hide packages transformers imports (benchmarks/kernels.py once hid `kernels`)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402

SHAPE = {"hidden": 256, "layers": 4, "heads": 8, "vocab": 2048, "seq": 128, "micro_batch": 4, "micro_batches": 4}
GRID = {"pipe": 2, "data": 1, "tensor": 2}
STEPS = 3


def _config() -> dict:
    return {"topology": GRID, "schedule": {"name": "1f1b", "micro_batches": SHAPE["micro_batches"]},
            "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4}, "train": {"grad_clip": 1.0}}


def _gpt(groups: pg.ProcessGroups) -> pg.PipelineModule:
    from examples.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=SHAPE["vocab"], seq_len=SHAPE["seq"], n_layer=SHAPE["layers"], n_head=SHAPE["heads"],
                    n_embd=SHAPE["hidden"])
    return GPT(cfg, topology=groups.topology, tensor_group=groups.tensor_parallel_group)


def _llama(groups: pg.ProcessGroups) -> pg.PipelineModule:
    from transformers import LlamaConfig

    from pipegrid import hf

    ffn = 2 * round(8 * SHAPE["hidden"] / 3 / 2)  # gated: three matrices of h x ffn ~ the GPT's two of h x 4h
    config = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=ffn, num_hidden_layers=SHAPE["layers"],
                         num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                         vocab_size=SHAPE["vocab"], max_position_embeddings=SHAPE["seq"], tie_word_embeddings=True)
    return hf.from_config(config, topology=groups.topology, tensor_group=groups.tensor_parallel_group)


def _train(model_name: str) -> float:
    """ms per step on this rank (after one warm step)."""
    cfg = _config()
    groups = pg.init_distributed(cfg)
    model = (_gpt if model_name == "pipegrid GPT" else _llama)(groups)
    engine = pg.initialize(model, cfg, groups)
    gen = torch.Generator().manual_seed(0)
    shape = (SHAPE["micro_batch"], SHAPE["seq"])
    batches = [(ids, ids.clone()) for ids in (torch.randint(0, SHAPE["vocab"], shape, generator=gen)
                                               for _ in range(SHAPE["micro_batches"]))]
    engine.train_batch(iter(batches))
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.train_batch(iter(batches))
    return (time.perf_counter() - start) / STEPS * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensor", type=int, default=2, help="the tensor degree (1: where the time goes without it)")
    parser.add_argument("--out", default="benchmarks/results/hf_tp_speed.json")
    args = parser.parse_args(argv)
    GRID["tensor"] = args.tensor
    world = GRID["pipe"] * GRID["data"] * GRID["tensor"]
    times: dict[str, list[float]] = {"pipegrid GPT": [], "transformers Llama": []}
    for _ in range(args.rounds):  # alternate, so machine noise hits both alike
        for name in times:
            times[name].append(max(run_local(_train, world, (name,), backend=None, timeout_s=900)))
    gpt = statistics.median(times["pipegrid GPT"])
    print(f"| model ({SHAPE['layers']} x {SHAPE['hidden']}, pipe {GRID['pipe']} x tensor {GRID['tensor']}) "
          "| ms/step (median) | rounds | vs GPT |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.0f} | {', '.join(f'{t:.0f}' for t in ts)} | {med / gpt:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "load": os.getloadavg(), "torch": torch.__version__, "shape": SHAPE,
                   "grid": GRID, "ms_per_step": times}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
