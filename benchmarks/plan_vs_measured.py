"""Planner against the engine on this machine: profile, predict every schedule at pipe=2, measure.

Profiles the 8-block residual MLP of ``vs_torch_pipelining.py`` in two processes at once,
bound to a core each as the engine binds its ranks (so the costs carry the contention of 2
processes on 2 cores): each rank replays its own compute stream of every schedule in the
schedule's order, the schedules' sweeps alternating (``plan.replay.StreamReplay``: what the
prediction uses), and, for the
column beside it, times its chunks alone (2 of 4 blocks, or 4 of 2 for the V schedules;
forward, whole backward, split I/W: ``profile_chunks``). It measures what posting a
point-to-point transfer costs the host and what a message adds to a lockstep round; times
the Adam step the same way; and what a receive posted after its send waits over one posted
before (``measure_receive_wake``: the sender's gloo thread waking on its busy core). The
planner (``pipegrid.plan.predict``) predicts each schedule's step with the schedule simulator
and the engine then runs every schedule, alternating; each round profiles and predicts again
(the load of a shared machine drifts), and the table gives medians over rounds and the
planner's pick (``pipegrid.plan.choose`` on the median predictions: within its tie band, the
fewest messages, then the least memory).

    python benchmarks/plan_vs_measured.py [--rounds 3] [--workloads compute-bound [overhead-bound]]
                                          [--out benchmarks/results/plan_vs_measured.json]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from pipegrid.plan import Candidate, ClusterSpec, DeviceSpec, OptimizerSpec, choose, predict  # noqa: E402
from pipegrid.plan.model import ChunkCost  # noqa: E402
from pipegrid.plan.profile import (  # noqa: E402
    measure_receive_wake, profile_chunks, profile_layers, time_optimizer_step,
)
from pipegrid.plan.replay import StreamReplay  # noqa: E402
from pipegrid.schedules import build  # noqa: E402
from pipegrid.topology.affinity import bind_cores  # noqa: E402
from vs_torch_pipelining import BLOCKS, STAGES, WORKLOADS, Block, pipegrid_run  # noqa: E402

_ADAM_BYTES_PER_PARAM = 28  # what predict() charges per parameter for the optimizer step
# (schedule, chunks per rank, schedule.coalesce): every schedule the engine benchmark runs
CANDIDATES = [("gpipe", 1, 1), ("1f1b", 1, 1), ("zb_h1", 1, 1), ("zb_v", 2, 1), ("dualpipev", 2, 1),
              ("1f1b", 1, 4)]
ONLY_ON = {("1f1b", 1, 4): "overhead-bound"}  # grouping only pays where messages cost more than compute


def _label(schedule: str, v: int, coalesce: int) -> str:
    return schedule + (f" coalesce={coalesce}" if coalesce > 1 else "")


def _inputs(w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(w["micro_batch"], w["hidden"], generator=gen),
            torch.randn(w["micro_batch"], w["hidden"], generator=gen))


def _own_chunks(chunks: int, rank: int) -> list[int]:
    """The model chunks pipe rank ``rank`` holds: one in a loop, two in a V (r and 2p-1-r)."""
    return [rank] if chunks == STAGES else [rank, 2 * STAGES - 1 - rank]


def _profile_rank(w: dict, chunk_counts: tuple[int, ...], repeats: int, cases: tuple = ()) -> dict:
    """One of two ranks profiling at once, each its own chunks as the engine places them (its
    own blocks in memory, the other rank computing beside it), and Adam's step on a stage; then
    each case's own compute stream replayed in the schedule's order (``profile_stream``)."""
    import torch.distributed as dist

    bind_cores()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    x, y = _inputs(w)
    measured: dict[int, dict[int, ChunkCost]] = {}
    for n in chunk_counts:
        size = BLOCKS // n
        dist.barrier()
        measured[n] = {c: profile_chunks([pg.LayerSpec(Block, w["hidden"]) for _ in range(size)], [size], x,
                                         loss_fn=torch.nn.functional.mse_loss if c == n - 1 else None,
                                         labels=y, repeats=repeats, input_grad=c > 0)[0]
                       for c in _own_chunks(n, rank)}
    streams = _replay_cases(w, cases, rank, x, y)
    params = sum(p.numel() for p in Block(w["hidden"]).parameters()) * BLOCKS // STAGES
    dist.barrier()
    return {"chunks": measured, "streams": streams, "adam_s": time_optimizer_step(params), "stage_params": params}


def _replay_cases(w: dict, cases: tuple, rank: int, x: torch.Tensor, y: torch.Tensor,
                  repeats: int = 5) -> dict[str, dict[int, ChunkCost]]:
    """This rank's compute stream of every case replayed in order, both ranks at once, the
    cases' sweeps alternating (a load transient hits every schedule alike): cost per model stage."""
    import torch.distributed as dist

    replays = {}
    for schedule, v, coalesce in cases:
        built = build(schedule, STAGES, w["micro_batches"], v, coalesce=coalesce)
        size, stages = BLOCKS // (STAGES * v), built.stages_of(rank)
        replays[_label(schedule, v, coalesce)] = StreamReplay(
            built.streams[rank], {s: [pg.LayerSpec(Block, w["hidden"]) for _ in range(size)] for s in stages},
            dict.fromkeys(stages, x), last_stage=built.num_model_stages - 1,
            loss_fn=torch.nn.functional.mse_loss, labels=y)
    for sweep in range(repeats + 1):  # the first sweep warms caches and allocators
        for replay in replays.values():
            dist.barrier()
            replay.sweep(record=sweep > 0)
    return {label: replay.costs() for label, replay in replays.items()}


def profile_under_contention(w: dict, cases: list[tuple[str, int, int]], repeats: int = 10) -> dict:
    """Chunk costs for 2 and 4 chunks, each from the rank that runs it; each case's streams
    replayed (chunk costs per case, model-stage order); the Adam step (mean of both ranks)."""
    ranks = run_local(_profile_rank, STAGES, (w, (STAGES, 2 * STAGES), repeats, tuple(cases)), timeout_s=600)
    chunks = {n: [next(r["chunks"][n][c] for r in ranks if c in r["chunks"][n]) for c in range(n)]
              for n in ranks[0]["chunks"]}
    streams = {label: [next(r["streams"][label][s] for r in ranks if s in r["streams"][label])
                       for s in range(STAGES * v)]
               for label, v in ((_label(*case), case[1]) for case in cases)}
    return {"chunks": chunks, "streams": streams, "adam_s": statistics.mean(r["adam_s"] for r in ranks),
            "stage_params": ranks[0]["stage_params"]}


def _lockstep(w: dict, exchange: bool, rounds: int = 40) -> tuple[float, float]:
    """(seconds per round, seconds posting per round): both ranks run one stage's forward+backward
    of a micro-batch, then (if ``exchange``) trade one activation-sized message each way, posted
    as the engine posts a send with the next receive (one ``batch_isend_irecv``)."""
    import torch.distributed as dist
    from torch import nn

    bind_cores()
    torch.manual_seed(0)
    stage = nn.Sequential(*[Block(w["hidden"]) for _ in range(BLOCKS // STAGES)])
    x = torch.randn(w["micro_batch"], w["hidden"])
    payload, inbox = torch.randn_like(x), torch.empty_like(x)
    peer = 1 - dist.get_rank()
    posting = 0.0
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        stage(x).sum().backward()
        if exchange:
            posted = time.perf_counter()
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, payload, peer),
                                            dist.P2POp(dist.irecv, inbox, peer)])
            posting += time.perf_counter() - posted
            for work in works:
                work.wait()
    dist.barrier()
    return (time.perf_counter() - start) / rounds, posting / rounds


def measure_message_cost(w: dict, repeats: int = 2) -> tuple[float, float]:
    """(latency, post) of one point-to-point message here while both processes compute.

    post: host time to post a transfer. latency: what a message adds to the lockstep round
    beyond its posting, halved as before (both ranks' messages cross at once)."""
    with_msgs = [run_local(_lockstep, STAGES, (w, True))[0] for _ in range(repeats)]
    without = statistics.median(run_local(_lockstep, STAGES, (w, False))[0][0] for _ in range(repeats))
    round_s = statistics.median(r[0] for r in with_msgs)
    post_s = statistics.median(r[1] for r in with_msgs)
    return max(round_s - without - post_s, 0.0) / 2, post_s


def predict_all(w: dict, cases: list[tuple[str, int, int]], profile: dict, latency: float, post: float,
                wake: float = 0.0) -> dict:
    """The planner's prediction per case, from the chunk costs measured under contention."""
    torch.set_num_threads(1)
    layers = profile_layers([pg.LayerSpec(Block, w["hidden"]) for _ in range(BLOCKS)], _inputs(w)[0], repeats=1)
    params = profile["stage_params"]
    # costs are measured with both processes busy: no further slowdown; the Adam step, also timed
    # with both busy, is given as the bandwidth predict() divides the optimizer's bytes by
    device = DeviceSpec(peak_flops=1e11, memory_bytes=8 * 2 ** 30, post_s=post, wake_s=wake,
                        memory_bandwidth=params * _ADAM_BYTES_PER_PARAM / profile["adam_s"])
    cluster = ClusterSpec("cpu_2", 1, STAGES, device, intra_gbytes_per_s=5.0, inter_gbytes_per_s=5.0,
                          intra_latency_us=latency * 1e6, inter_latency_us=latency * 1e6)
    out = {}
    for schedule, v, coalesce in cases:
        label, candidate = _label(schedule, v, coalesce), Candidate(pipe=STAGES, schedule=schedule,
                                                                     virtual_stages=v, coalesce=coalesce)
        pred, isolated = (predict(layers, candidate, cluster, micro_batches=w["micro_batches"],
                                  optimizer=OptimizerSpec("adam", "float32"), chunk_costs=chunk_costs)
                          for chunk_costs in (profile["streams"][label], profile["chunks"][STAGES * v]))
        out[label] = {
            "prediction": pred, "messages": pred.messages, "peak_memory_bytes": pred.peak_memory_bytes,
            "predicted_s": pred.step_s, "pipeline_s": pred.pipeline_s, "optimizer_s": pred.optimizer_s,
            "bubble": pred.bubble_fraction, "costs": pred.costs, "stage_costs": pred.stage_costs,
            "isolated_s": isolated.step_s}
    return out


def run_workload(name: str, rounds: int) -> dict:
    """Each round profiles, predicts and runs every schedule again, so a machine whose load
    drifts (other jobs) is measured and predicted under the same load; medians over rounds."""
    w = WORKLOADS[name]
    cases = [c for c in CANDIDATES if ONLY_ON.get(c, name) == name]
    per_round = []
    for _ in range(rounds):
        load = os.getloadavg()[0]
        profile = profile_under_contention(w, cases)
        latency, post = measure_message_cost(w)
        wake = measure_receive_wake(w["micro_batch"] * w["hidden"] * 4)
        predicted = predict_all(w, cases, profile, latency, post, wake)
        for schedule, v, coalesce in cases:  # alternate schedules so machine noise hits all of them alike
            label = _label(schedule, v, coalesce)
            predicted[label]["measured_s"] = run_local(pipegrid_run, STAGES, (w, schedule, coalesce), timeout_s=600)[0]
        per_round.append({"latency": latency, "post": post, "wake": wake, "adam_s": profile["adam_s"],
                          "profile": profile, "load": [load, os.getloadavg()[0]],
                          "results": predicted})
    med = statistics.median
    results = {}
    for label in per_round[0]["results"]:
        rows = [r["results"][label] for r in per_round]
        results[label] = {**rows[-1], "predicted_s": med(r["predicted_s"] for r in rows),
                          "measured_s": med(r["measured_s"] for r in rows),
                          "rounds_predicted_s": [r["predicted_s"] for r in rows],
                          "rounds_s": [r["measured_s"] for r in rows],
                          "isolated_s": med(r["isolated_s"] for r in rows),
                          "bubble": med(r["bubble"] for r in rows)}
        results[label]["error"] = results[label]["predicted_s"] / results[label]["measured_s"] - 1
        results[label]["isolated_error"] = results[label]["isolated_s"] / results[label]["measured_s"] - 1
    choice = choose([dataclasses.replace(r["prediction"], step_s=r["predicted_s"]) for r in results.values()])
    pick = next(label for label, r in results.items() if r["prediction"].candidate == choice.pick.candidate)
    for r in results.values():
        del r["prediction"]  # (not JSON)
    fastest = min(results, key=lambda k: results[k]["measured_s"])
    return {"message_latency_s": med(r["latency"] for r in per_round), "post_s": med(r["post"] for r in per_round),
            "wake_s": med(r["wake"] for r in per_round), "choice": choice.reason,
            "tied": [label for label, r in results.items() if label != pick
                     and r["predicted_s"] <= min(x["predicted_s"] for x in results.values()) * (1 + choice.within)],
            "adam_s": med(r["adam_s"] for r in per_round),
            "chunks": {n: [vars(c) for c in cs] for n, cs in per_round[-1]["profile"]["chunks"].items()},
            "streams": {k: [vars(c) for c in cs] for k, cs in per_round[-1]["profile"]["streams"].items()},
            "loads": [r["load"] for r in per_round], "tie_within": choice.within,
            "planner_pick": pick, "measured_fastest": fastest, "results": results}


def table(workloads: dict) -> str:
    header = ("| workload | schedule | predicted ms/step | measured ms/step (median) | rounds min-max | error "
              "| error from isolated chunks | simulated bubble | messages/step |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, wl in workloads.items():
        for label, r in wl["results"].items():
            mark = " (pick)" if label == wl["planner_pick"] else " (tie)" if label in wl["tied"] else ""
            lines.append(f"| {name} | {label}{mark} | {r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | "
                         f"{min(r['rounds_s']) * 1e3:.1f}-{max(r['rounds_s']) * 1e3:.1f} | {r['error']:+.0%} | "
                         f"{r['isolated_error']:+.0%} | "
                         f"{r['bubble']:.1%} | {r['messages']} |")
    for name, wl in workloads.items():
        results, pick, fastest = wl["results"], wl["planner_pick"], wl["measured_fastest"]
        gap = results[pick]["measured_s"] / results[fastest]["measured_s"] - 1
        agree = "agrees" if pick == fastest else f"the pick measured {gap:+.1%} over it, " + \
            ("within the tie band" if gap <= wl["tie_within"] else "OUTSIDE the tie band")
        lines.append(f"{name}: planner's pick {pick}, measured fastest {fastest} ({agree}); post "
                     f"{wl['post_s'] * 1e3:.2f} ms, message latency {wl['message_latency_s'] * 1e3:.2f} ms, "
                     f"late-receive wake {wl['wake_s'] * 1e3:.2f} ms, Adam {wl['adam_s'] * 1e3:.1f} ms")
        lines.append(f"{name}: {wl['choice']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", default=["compute-bound"],
                        help="compute-bound (default, ~2 minutes idle) and/or overhead-bound (~1.5 more)")
    parser.add_argument("--out", default="benchmarks/results/plan_vs_measured.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    workloads = {name: run_workload(name, args.rounds) for name in args.workloads}
    text = table(workloads)
    print(text)
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{time.perf_counter() - started:.0f} s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor()
                   or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "rounds": args.rounds, "load_average": [load_before, os.getloadavg()],
                   "workloads": {n: WORKLOADS[n] for n in args.workloads}, "results": workloads,
                   "table": text}, f, indent=2, default=list)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
