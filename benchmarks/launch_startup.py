"""What starting local workers costs: forked against spawned, in alternating rounds, and what
counting GPUs without initialising CUDA costs (the launcher does it before it forks).

    python benchmarks/launch_startup.py [--rounds 3] [--out benchmarks/results/launch_startup.json]
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

import torch  # noqa: E402  (imported in the launcher, as every entry point has it)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.topology.devices import visible_gpu_count  # noqa: E402


def _rank() -> int:
    return int(os.environ["RANK"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/launch_startup.json")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"fork": [], "spawn": []}
    for _ in range(args.rounds):  # alternate, so machine noise hits both alike
        for method in times:
            start = time.perf_counter()
            run_local(_rank, args.workers, backend="gloo", start_method=method, timeout_s=120)
            times[method].append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(100):
        visible_gpu_count()
    count_us = (time.perf_counter() - start) / 100 * 1e6
    print(f"| start method | {args.workers} workers joined over gloo, s (median) | rounds |")
    print("|---|---|---|")
    for method, ts in times.items():
        print(f"| {method} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    print(f"\nvisible_gpu_count(): {count_us:.1f} us per call ({torch.cuda.device_count()} GPU(s) seen)")
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "workers": args.workers,
                   "seconds": times, "gpu_count_us": count_us}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
