"""How long one gloo send+receive exchange between two ranks takes after each rank computed.

Two processes, one core each (pipegrid's comm.bind_cores), trade a 4 KiB message in one
``batch_isend_irecv`` after ``busy_ms`` of small matmuls, as two pipeline stages do. Rows
with gloo's own threads at nice 19 show the cost of gloo's progress thread preempting its
rank inside a send/receive call: it only try-locks the connection, so it spins until its
time slice ends while the preempted thread holds the lock.
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

BUSY_MS = (0.0, 0.3, 1.5)
EXCHANGES = 200


def _gloo_threads() -> list[int]:
    tids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if "gloo" in f.read():
                tids.append(int(tid))
    return tids


def exchange_times(busy_ms: float, nice: int) -> list[float]:
    """One rank: seconds each of EXCHANGES exchanges took, after busy_ms of compute each."""
    rank = int(os.environ["RANK"])
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # before joining: gloo's threads inherit it
    dist.init_process_group("gloo", init_method=os.environ["PIPEGRID_INIT_METHOD"], rank=rank, world_size=2)
    for tid in _gloo_threads():
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    peer, a = 1 - rank, torch.randn(64, 64)
    out, buf = torch.ones(1024), torch.zeros(1024)
    times = []
    dist.barrier()
    for _ in range(EXCHANGES):
        end = time.perf_counter() + busy_ms / 1e3
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)
        start = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, buf, peer)])
        for work in works:
            work.wait()
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gloo_exchange.json")
    args = parser.parse_args()
    rows = []
    for nice in (0, 19):
        for busy in BUSY_MS:
            times = [t for rank in run_local(exchange_times, 2, (busy, nice), backend=None, timeout_s=120)
                     for t in rank]
            rows.append({"gloo_nice": nice, "busy_ms": busy, "median_us": statistics.median(times) * 1e6,
                         "p90_us": statistics.quantiles(times, n=10)[8] * 1e6})
    table = ["| gloo threads' nice | compute before (ms) | exchange median (µs) | p90 (µs) |", "|---|---|---|---|"]
    table += [f"| {r['gloo_nice']} | {r['busy_ms']} | {r['median_us']:.0f} | {r['p90_us']:.0f} |" for r in rows]
    print("\n".join(table))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpus": os.cpu_count(),
                   "torch": torch.__version__, "exchanges": EXCHANGES, "rows": rows, "table": "\n".join(table)},
                  f, indent=2)


if __name__ == "__main__":
    main()
