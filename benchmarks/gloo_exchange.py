"""How long a gloo exchange or all-reduce between two ranks takes right after each computed.

Two processes, one core each (pipegrid's comm.bind_cores), after ``busy_ms`` of small
matmuls either trade a 4 KiB message in one ``batch_isend_irecv`` (two pipeline stages)
or all-reduce 4 KiB (data-parallel gradients, tied weights). The rows vary the niceness
of gloo's own threads: at the rank's priority, gloo's progress
thread can preempt its rank inside a send or collective that holds a connection's lock,
and then spins on a try-lock until its time slice ends.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked workers inherit it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipegrid.launch import run_local  # noqa: E402

BUSY_MS = (0.0, 1.5)
NICE = (0, 10, 19)
REPEATS = 200


def lower_gloo_threads(nice: int) -> None:
    """Raise the niceness of gloo's threads (its progress loops and c10d's workers)."""
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        if name.startswith("gloo") or name.startswith("pt_gloo"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def op_times(op: str, busy_ms: float, nice: int) -> list[float]:
    """One rank: seconds each of REPEATS operations took, each after busy_ms of compute."""
    rank = int(os.environ["RANK"])
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # before joining: gloo's threads inherit it
    dist.init_process_group("gloo", init_method=os.environ["PIPEGRID_INIT_METHOD"], rank=rank, world_size=2)
    lower_gloo_threads(nice)
    peer, a = 1 - rank, torch.randn(64, 64)
    out, buf = torch.ones(1024), torch.zeros(1024)
    times = []
    dist.barrier()
    for _ in range(REPEATS):
        end = time.perf_counter() + busy_ms / 1e3
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)
        start = time.perf_counter()
        if op == "exchange":
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer),
                                                dist.P2POp(dist.irecv, buf, peer)]):
                work.wait()
        else:
            dist.all_reduce(out)
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gloo_exchange.json")
    args = parser.parse_args()
    rows = []
    for op in ("exchange", "all_reduce"):
        for busy in BUSY_MS:
            for nice in NICE:
                times = [t for rank in run_local(op_times, 2, (op, busy, nice), backend=None, timeout_s=120)
                         for t in rank]
                rows.append({"op": op, "busy_ms": busy, "gloo_nice": nice,
                             "median_us": statistics.median(times) * 1e6,
                             "p90_us": statistics.quantiles(times, n=10)[8] * 1e6})
    table = ["| operation | compute before (ms) | gloo threads' nice | median (µs) | p90 (µs) |", "|---|---|---|---|---|"]
    table += [f"| {r['op']} | {r['busy_ms']} | {r['gloo_nice']} | {r['median_us']:.0f} | {r['p90_us']:.0f} |"
              for r in rows]
    print("\n".join(table))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpus": os.cpu_count(),
                   "torch": torch.__version__, "repeats": REPEATS, "rows": rows, "table": "\n".join(table)},
                  f, indent=2)


if __name__ == "__main__":
    main()
