"""Planner against the engine on this machine: profile, predict pipe=2 1f1b, then measure.

Profiles the 8-block residual MLP of ``vs_torch_pipelining.py`` layer by layer (one process,
one thread), measures how much two busy processes slow each other (the CPU device model's
contention factor), what one point-to-point message costs while both compute (the link
latency) and the Adam step, predicts the pipe=2 1f1b step with the schedule
simulator (also with schedule.coalesce=4 on the overhead-bound workload), then times
pipegrid's engine on the same workloads and prints both.

    python benchmarks/plan_vs_measured.py [--rounds 3] [--out benchmarks/results/plan_vs_measured.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.plan import Candidate, ClusterSpec, DeviceSpec, OptimizerSpec, predict  # noqa: E402
from pipegrid.plan.profile import measure_contention, profile_layers, time_optimizer_step  # noqa: E402
from vs_torch_pipelining import BLOCKS, STAGES, WORKLOADS, Block, pipegrid_run  # noqa: E402

_ADAM_BYTES_PER_PARAM = 28  # what predict() charges per parameter for the optimizer step


def _profile(w: dict) -> tuple[list, float]:
    torch.set_num_threads(1)
    layers = [pg.LayerSpec(Block, w["hidden"]) for _ in range(BLOCKS)]
    costs = profile_layers(layers, torch.randn(w["micro_batch"], w["hidden"]), repeats=5)
    stage_params = sum(c.parameters for c in costs) // STAGES
    return costs, time_optimizer_step(stage_params)


def _lockstep(w: dict, exchange: bool, rounds: int = 40) -> float:
    """Seconds per round: both ranks run one stage's forward+backward of a micro-batch,
    then (if ``exchange``) trade one activation-sized message each way."""
    import torch.distributed as dist
    from torch import nn

    torch.manual_seed(0)
    stage = nn.Sequential(*[Block(w["hidden"]) for _ in range(BLOCKS // STAGES)])
    x = torch.randn(w["micro_batch"], w["hidden"])
    payload, inbox = torch.randn_like(x), torch.empty_like(x)
    peer = 1 - dist.get_rank()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        stage(x).sum().backward()
        if exchange:
            work = dist.isend(payload, peer)
            dist.recv(inbox, peer)
            work.wait()
    dist.barrier()
    return (time.perf_counter() - start) / rounds


def measure_message_cost(w: dict) -> float:
    """What one point-to-point message costs here while both processes compute: the
    lockstep round with a message each way, minus the same round without, halved."""
    with_msgs = statistics.median(run_local(_lockstep, STAGES, (w, True))[0] for _ in range(3))
    without = statistics.median(run_local(_lockstep, STAGES, (w, False))[0] for _ in range(3))
    return max(with_msgs - without, 0.0) / 2


def predict_workload(w: dict, contention: float, coalesce: int = 1) -> dict:
    """Predicted seconds per step for pipe=2 1f1b (``coalesce`` micro-batches per message)."""
    costs, adam_s = _profile(w)
    message_s = measure_message_cost(w)
    stage_params = sum(c.parameters for c in costs) // STAGES
    # the measured Adam step as the bandwidth predict() divides by; both stages step at
    # once, so it is slowed by the same measured contention as the layers
    device = DeviceSpec(peak_flops=1e11, memory_bytes=8 * 2 ** 30, slowdown=contention,
                        memory_bandwidth=stage_params * _ADAM_BYTES_PER_PARAM / (adam_s * contention))
    cluster = ClusterSpec("cpu_2", 1, STAGES, device, intra_gbytes_per_s=5.0, inter_gbytes_per_s=5.0,
                          intra_latency_us=message_s * 1e6, inter_latency_us=message_s * 1e6)
    pred = predict(costs, Candidate(pipe=STAGES, schedule="1f1b", coalesce=coalesce), cluster,
                   micro_batches=w["micro_batches"],
                   optimizer=OptimizerSpec("adam", "float32"))
    return {"predicted_s": pred.step_s, "message_s": message_s, "pipeline_s": pred.pipeline_s, "optimizer_s": pred.optimizer_s,
            "bubble": pred.bubble_fraction, "costs": pred.costs,
            "layer_forward_s": [c.forward_s for c in costs], "layer_backward_s": [c.backward_s for c in costs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/plan_vs_measured.json")
    args = parser.parse_args()
    contention = measure_contention(STAGES)
    results = {}
    cases = [(name, w, 1) for name, w in WORKLOADS.items()] + [("overhead-bound coalesce=4", WORKLOADS["overhead-bound"], 4)]
    for name, w, coalesce in cases:
        pred = predict_workload(w, contention, coalesce)
        measured = [run_local(pipegrid_run, STAGES, (w, "1f1b", coalesce), timeout_s=600)[0]
                    for _ in range(args.rounds)]
        pred["measured_s"] = statistics.median(measured)
        pred["error"] = pred["predicted_s"] / pred["measured_s"] - 1
        results[name] = pred
    lines = [f"contention factor (2 busy processes vs 1): {contention:.2f}",
             "| workload | predicted ms/step | measured ms/step | error |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | {r['error']:+.0%} |"
              for n, r in results.items()]
    table = "\n".join(lines)
    print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor()
                   or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "rounds": args.rounds, "contention": contention, "workloads": WORKLOADS,
                   "results": results, "table": table}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
