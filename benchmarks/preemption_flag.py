"""What saving on a signal costs a step: the one-number all-reduce that lets the ranks agree
on a stop signal, made at the end of every ``train_batch`` while handlers are armed and
``checkpoint.dir`` is set (``train.save_on_signal``, on by default).

vs_torch_pipelining.py's overhead-bound workload (8 residual MLP blocks, h=64, pipe=2,
16 micro-batches of 4, Adam), where a message costs more than a micro-batch's compute and
an extra collective shows most, and its compute-bound one (h=512). Rows run alternately,
each in freshly forked processes; medians over rounds. No signal is sent: this is the
price every step pays for being ready.

    python benchmarks/preemption_flag.py [--rounds 7] [--workloads overhead-bound compute-bound]
        [--out benchmarks/results/preemption_flag.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked workers inherit it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from benchmarks.vs_torch_pipelining import ADAM, BLOCKS, STAGES, WORKLOADS, Block, _timed  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402

VARIANTS = {  # name -> (train.save_on_signal, checkpoint.dir set)
    "no handlers (save_on_signal=[])": ([], True),
    "armed, no checkpoint.dir (no flag)": (["SIGTERM", "SIGUSR1"], False),
    "armed with checkpoint.dir (flag all-reduce)": (["SIGTERM", "SIGUSR1"], True),
}


def run(w: dict, coalesce: int, signals: list[str], with_dir: bool) -> float:
    model = pg.PipelineModule([pg.LayerSpec(Block, w["hidden"]) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=pg.Topology(pipe=STAGES),
                              partition_method="uniform")
    with tempfile.TemporaryDirectory() as directory:  # empty: nothing to resume, nothing saved
        engine = pg.initialize(model, {"schedule": {"name": "1f1b", "micro_batches": w["micro_batches"],
                                                    "coalesce": coalesce},
                                       "optimizer": {"_target_": "torch.optim.Adam", **ADAM},
                                       "train": {"save_on_signal": signals},
                                       "checkpoint": {"dir": directory if with_dir else None}})
        return _timed(lambda batch: engine.train_batch(iter(batch)), w, dist.barrier)


def bare_flag(repeats: int) -> list[float]:
    """Seconds of the flag's all-reduce alone (int64[1], MAX), each right after a barrier."""
    flag, times = torch.zeros(1, dtype=torch.int64), []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--out", default="benchmarks/results/preemption_flag.json")
    args = parser.parse_args()
    cases = [(load, k) for load, k in (("overhead-bound", 1), ("overhead-bound", 4), ("compute-bound", 1))
             if load in args.workloads]
    times = {(load, k, name): [] for load, k in cases for name in VARIANTS}
    for _ in range(args.rounds):  # alternate, so machine noise hits every variant alike
        for load, k in cases:
            for name, (signals, with_dir) in VARIANTS.items():
                result = run_local(run, STAGES, (WORKLOADS[load], k, signals, with_dir), timeout_s=600)
                times[(load, k, name)].append(result[0])
    rows = []
    for (load, k, name), samples in times.items():
        base = statistics.median(times[(load, k, next(iter(VARIANTS)))])
        median = statistics.median(samples)
        rows.append({"workload": load, "coalesce": k, "variant": name, "median_ms": median * 1e3,
                     "extra_ms": (median - base) * 1e3, "rounds_ms": [t * 1e3 for t in samples]})
    bare = [t for rank in run_local(bare_flag, STAGES, (500,), timeout_s=120) for t in rank]
    rows.append({"workload": "none", "coalesce": 0, "variant": "the flag all-reduce alone, after a barrier",
                 "median_ms": statistics.median(bare) * 1e3, "p90_ms": statistics.quantiles(bare, n=10)[8] * 1e3})
    table = ["| workload | coalesce | variant | ms/step (median) | vs no handlers (ms) |", "|---|---|---|---|---|"]
    table += [f"| {r['workload']} | {r['coalesce']} | {r['variant']} | {r['median_ms']:.2f} | {r['extra_ms']:+.2f} |"
              for r in rows[:-1]]
    table.append(f"| (2 ranks) | | {rows[-1]['variant']} | {rows[-1]['median_ms']:.3f} (p90 {rows[-1]['p90_ms']:.3f}) | |")
    print("\n".join(table))
    write_record(args.out, rows, table, rounds=args.rounds)


if __name__ == "__main__":
    main()
