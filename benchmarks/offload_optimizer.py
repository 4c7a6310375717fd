"""Host optimizers for ZeRO-Offload, side by side on CPU tensors: one AdamW step over a flat fp32
shard (what ``zero.offload_optimizer=cpu`` steps on the host), as torch's for-loop, foreach and
fused (pipegrid's choice: ``pipe/optimizer_build.py``) implementations, DeepSpeed's CPUAdam and
torchao's CPUOffloadOptimizer where they run here (each says why not otherwise).

Rounds alternate between the optimizers so a busy period of a shared machine hits them alike;
the median step is kept. Adam streams ~28 bytes per parameter (read and write master, m, v;
read the gradient), so GB/s = 28 x parameters / seconds is comparable with memory bandwidth.

    python benchmarks/offload_optimizer.py [--elements 16777216] [--rounds 7]
        [--out benchmarks/results/offload_optimizer.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.record import write_record

Builder = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
HYPER = {"lr": 1e-4, "weight_decay": 0.01}


def _deepspeed_cpu_adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use

    return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)


def _torchao_offload(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # state on the host, parameters on CUDA
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, torch.optim.AdamW, **HYPER)


OPTIMIZERS: dict[str, Builder] = {
    "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPER),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER),
    "torch AdamW fused (pipegrid)": lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER),
    "DeepSpeed CPUAdam": _deepspeed_cpu_adam,
    "torchao CPUOffloadOptimizer": _torchao_offload,
}


def _shard(elements: int, seed: int) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    shard = torch.nn.Parameter(torch.randn(elements, generator=gen))
    shard.grad = torch.randn(elements, generator=gen)
    return shard


def _build(elements: int) -> tuple[dict[str, torch.optim.Optimizer], dict[str, str]]:
    """Each optimizer over its own shard, one step taken (the state exists); why the others did not build."""
    built, refused = {}, {}
    for name, builder in OPTIMIZERS.items():
        try:
            optimizer = builder([_shard(elements, 0)])
            optimizer.step()
            built[name] = optimizer
        except Exception as error:  # noqa: BLE001 - each library says why in its own words
            refused[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return built, refused


def measure(elements: int, rounds: int) -> tuple[list[dict], dict[str, str]]:
    built, refused = _build(elements)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, optimizer in built.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"optimizer": name, "median_step_s": median, "gbytes_per_s": 28 * elements / median / 1e9})
    return rows, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 24, help="parameters in the shard (default 16M)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/offload_optimizer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, refused = measure(args.elements, args.rounds)
    fastest = min(rows, key=lambda r: r["median_step_s"])
    title = (f"AdamW step over {args.elements / 2**20:.0f}M fp32 parameters on {args.threads} CPU thread(s), "
             f"median of {args.rounds}")
    lines = [title, "| optimizer | median step s | GB/s | vs fastest |", "|---|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['median_step_s']:.4f} | {r['gbytes_per_s']:.1f} | "
              f"{r['median_step_s'] / fastest['median_step_s']:.2f} |" for r in rows]
    lines += [f"| {name} | did not run here: {why} | | |" for name, why in refused.items()]
    print("\n".join(lines))
    write_record(args.out, rows, lines, elements=args.elements, rounds=args.rounds, threads=args.threads,
                 refused=refused, load_average=os.getloadavg())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
