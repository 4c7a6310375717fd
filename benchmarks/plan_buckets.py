"""The planner's price for bucketed ZeRO-2 against a measured one: what bucket-by-bucket reduction
adds to a step over once per step, on ``benchmarks/zero_time.py``'s model (pipe=2 x data=2, gloo).

Each layout's step is timed as zero_time.py does (rounds alternate the layouts in one process tree);
then the same ranks time a gloo reduce between the two data ranks (1 element: the per-collective
cost; a stage's gradients: the bandwidth), and ``plan.predict.data_sync_s`` predicts the extra
seconds from those. The difference, not the absolute step, is compared: four processes on two
cores slow the compute, which the difference does not depend on.

    python benchmarks/plan_buckets.py [--out benchmarks/results/plan_buckets_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import zero_time  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.plan.hardware import Link  # noqa: E402
from pipegrid.plan.predict import Candidate, data_sync_s  # noqa: E402

LAYOUTS = {"once per step": ({"stage": 2}, None),
           "bucketed 2^24": ({"stage": 2, "reduce_every_micro_batch": True}, 1 << 24),
           "bucketed 2^18": ({"stage": 2, "reduce_every_micro_batch": True, "bucket_elements": 1 << 18}, 1 << 18)}
HIDDEN = zero_time.HIDDEN
STAGE_PARAMETERS = zero_time.BLOCKS // 2 * (HIDDEN * 2 * HIDDEN + 2 * HIDDEN + 2 * HIDDEN * HIDDEN + HIDDEN)


def _reduce_s(group, owner: int, numel: int, repeats: int) -> float:  # noqa: ANN001 - a ProcessGroup
    x = torch.ones(numel)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.reduce(x, owner, group=group)
    return (time.perf_counter() - start) / repeats


def _work() -> tuple[dict[str, list[float]], float, float]:
    zero_time.LAYOUTS = {name: zero for name, (zero, _) in LAYOUTS.items()}
    times = zero_time._times()
    rank = dist.get_rank()
    groups = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])]  # the data pairs of pipe=2 x data=2
    group, owner = (groups[0], 0) if rank < 2 else (groups[1], 2)
    return times, _reduce_s(group, owner, 1, 40), _reduce_s(group, owner, STAGE_PARAMETERS, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plan_buckets_cpu.json")
    args = parser.parse_args()
    load = os.getloadavg()
    per_rank = run_local(_work, 4, (), timeout_s=900)
    steps = zero_time.ROUNDS * zero_time.STEPS
    median = {name: statistics.median(max(r[0][name][i] for r in per_rank) for i in range(steps)) for name in LAYOUTS}
    small, big = (statistics.median(r[k] for r in per_rank) for k in (1, 2))
    link = Link(bandwidth=STAGE_PARAMETERS * 4 / max(big - small, 1e-9), latency=small / 2)
    once = data_sync_s(STAGE_PARAMETERS, 4, Candidate(2, 2, zero=2), zero_time.MICRO_BATCHES, link, 0.0, False)
    rows, lines = [], ["| layout | median step ms | measured extra ms | predicted extra ms |", "|---|---|---|---|"]
    for name, (_, bucket) in LAYOUTS.items():
        candidate = Candidate(2, 2, zero=2, bucket_elements=bucket)
        predicted = data_sync_s(STAGE_PARAMETERS, 4, candidate, zero_time.MICRO_BATCHES, link, 0.0, False,
                                post_s=small / 2) - once  # fp32 gradients; gloo overlaps nothing
        measured = median[name] - median["once per step"]
        rows.append({"layout": name, "median_step_s": median[name], "measured_extra_s": measured,
                     "predicted_extra_s": predicted})
        lines.append(f"| {name} | {median[name] * 1e3:.1f} | {measured * 1e3:+.1f} | {predicted * 1e3:+.1f} |")
    print("\n".join(lines))
    print(f"gloo reduce between the data pair: 1 element {small * 1e3:.2f} ms, a stage's "
          f"{STAGE_PARAMETERS * 4 / 1e6:.1f} MB {big * 1e3:.1f} ms ({link.bandwidth / 1e9:.2f} GB/s); "
          f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    write_record(args.out, rows, lines, reduce_one_element_s=small, reduce_stage_s=big, load_before=load[0],
                 load_after=os.getloadavg()[0], micro_batches=zero_time.MICRO_BATCHES, pipe=2, data=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
