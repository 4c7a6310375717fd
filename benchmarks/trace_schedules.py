"""Where a schedule's step goes, per instruction: traced engine steps against their simulation.

Runs the engine benchmark's model (``vs_torch_pipelining.py``) with ``trace.enabled`` for the
given schedules, alternating, and times every receive wait apart from the op that reads it
(a diagnostic wrapper around the executor's read, in this script only). Prints per rank: the
time per op kind net of waits, the waits and how many receives blocked, and the step the
simulator gives when fed this run's own mean op costs, model stage by model stage, with the
measured host time per transfer instruction as ``post``.

``--profiles``: after its traced steps each worker also measures its op costs the two ways the
planner can (``plan.replay.profile_stream``, the rank's stream replayed in order; and
``plan.profile.profile_chunks``, each chunk alone), and the report simulates the step from each
beside the engine's own. ``--cpu-clock`` times ops in thread CPU seconds (engine, replay and
chunks alike), so a third process's preemption on a shared machine does not count; the step
itself stays wall time.

    python benchmarks/trace_schedules.py [--schedules zb_h1 zb_v] [--rounds 4] [--steps 3]
                                         [--workload compute-bound] [--profiles] [--cpu-clock]
                                         [--out benchmarks/results/trace_schedules.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.plan.model import ChunkCost  # noqa: E402
from pipegrid.schedules import SCHEDULES, build, simulate  # noqa: E402
from vs_torch_pipelining import ADAM, BLOCKS, STAGES, WORKLOADS, Block, _data  # noqa: E402

_COMPUTE = re.compile(r"^(\d+)([FBIW])(\d+)$")
_TRANSFER = re.compile(r"^\d+(SA|RA|SG|RG)")


def _use_cpu_clock() -> None:
    """Op timings in this worker in thread CPU seconds: the modules that time ops see a ``time``
    whose perf_counter is thread_time (this worker process only; steps stay wall time here)."""
    import types

    import pipegrid.pipe.executor
    import pipegrid.plan.profile
    import pipegrid.plan.replay

    clock = types.SimpleNamespace(perf_counter=time.thread_time)
    for module in (pipegrid.pipe.executor, pipegrid.plan.profile, pipegrid.plan.replay):
        module.time = clock


def _profiles(w: dict, name: str) -> dict:
    """This rank's op costs per model stage: its stream replayed in order, and each chunk alone."""
    from pipegrid.plan.profile import profile_chunks
    from pipegrid.plan.replay import profile_stream

    v = (SCHEDULES[name].chunks or (1,))[0]
    schedule, rank = build(name, STAGES, w["micro_batches"], v), dist.get_rank()
    size, stages, last = BLOCKS // (STAGES * v), schedule.stages_of(rank), STAGES * v - 1
    x, y = _data(w, 0)[0]
    layers = lambda: [pg.LayerSpec(Block, w["hidden"]) for _ in range(size)]  # noqa: E731
    dist.barrier()
    replay = profile_stream(schedule.streams[rank], {s: layers() for s in stages}, dict.fromkeys(stages, x),
                            last_stage=last, loss_fn=nn.functional.mse_loss, labels=y)
    dist.barrier()
    alone = {s: profile_chunks(layers(), [size], x, loss_fn=nn.functional.mse_loss if s == last else None,
                               labels=y, repeats=8, input_grad=s > 0)[0] for s in stages}
    return {"replay": {s: vars(c) for s, c in replay.items()}, "alone": {s: vars(c) for s, c in alone.items()}}


def _traced_steps(w: dict, name: str, steps: int, profiles: bool = False, cpu_clock: bool = False) -> dict:
    from pipegrid.pipe.executor import Executor

    if cpu_clock:
        _use_cpu_clock()
    clock = time.thread_time if cpu_clock else time.perf_counter
    waits: list[tuple[str, float, float]] = []
    read = Executor._read_received

    def timed_read(self, op, state):
        start = clock()
        read(self, op, state)
        waits.append((str(op), start, clock()))

    Executor._read_received = timed_read  # this worker process only
    chunks = (SCHEDULES[name].chunks or (1,))[0]
    model = pg.PipelineModule([pg.LayerSpec(Block, w["hidden"]) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=pg.Topology(pipe=STAGES),
                              partition_method="uniform", virtual_stages=chunks,
                              stage_placement="v" if chunks == 2 else "loop")
    engine = pg.initialize(model, {"topology": {"pipe": STAGES}, "trace": {"enabled": True},
                                   "schedule": {"name": name, "micro_batches": w["micro_batches"]},
                                   "optimizer": {"_target_": "torch.optim.Adam", **ADAM}})
    out = []
    for step in range(3 + steps):
        dist.barrier()
        waits.clear()
        start, op_start = time.perf_counter(), clock()
        engine.train_batch(iter(_data(w, step)))
        if step >= 3:
            out.append({"step_s": time.perf_counter() - start,
                        "events": [(label, a - op_start, b - op_start) for _, label, a, b in engine.last_timeline()],
                        "waits": [(label, a - op_start, b - op_start) for label, a, b in waits]})
    return {"steps": out, "profiles": _profiles(w, name) if profiles else None}


def summarise(name: str, runs: list[list[dict]], micro_batches: int) -> dict:
    """Per rank: net op time by kind, waits, blocked receives; the simulated step from these costs
    (and, where the workers profiled, from the replay's and from the chunks-alone costs)."""
    rounds = [[worker["steps"] for worker in by_rank] for by_rank in runs]
    per_stage: dict[tuple[int, str], list[float]] = defaultdict(list)
    post, optimizer, steps, ranks = [], [], [], []
    for rank in range(STAGES):
        kinds: dict[str, list[float]] = defaultdict(list)
        waited, blocked, posts = [], [], []
        for by_rank in rounds:
            for step in by_rank[rank]:
                wait = {label: b - a for label, a, b in step["waits"]}
                waited.append(sum(wait.values()))
                blocked.append(sum(1 for t in wait.values() if t > 2e-4))
                posts.append(sum(1 for label, _, _ in step["events"] if _TRANSFER.match(label)))
                totals: dict[str, float] = defaultdict(float)
                for label, a, b in step["events"]:
                    match = _COMPUTE.match(label.rstrip("*"))
                    net = b - a - wait.get(label, 0.0)
                    if match:
                        per_stage[(int(match.group(1)), match.group(2))].append(net)
                        totals[match.group(2)] += net
                    elif _TRANSFER.match(label):
                        post.append(net)
                        totals["transfers"] += net
                    elif label == "STEP":
                        optimizer.append(net)
                for kind, total in totals.items():
                    kinds[kind].append(total)
        ranks.append({"ms_by_kind": {k: statistics.median(v) * 1e3 for k, v in kinds.items()},
                      "wait_ms": statistics.median(waited) * 1e3, "blocked_receives": statistics.median(blocked),
                      "transfer_instructions": statistics.median(posts)})
    steps = [max(by_rank[r][i]["step_s"] for r in range(STAGES)) for by_rank in rounds for i in range(len(by_rank[0]))]
    v = (SCHEDULES[name].chunks or (1,))[0]
    schedule = build(name, STAGES, micro_batches, v)
    split = SCHEDULES[name].split_backward
    stage_costs = [{"F": statistics.mean(per_stage[(s, "F")]),
                    "B": statistics.mean(per_stage[(s, "I" if split else "B")]),
                    "W": statistics.mean(per_stage[(s, "W")]) if split else 0.0,
                    **({"BW": statistics.mean(per_stage[(s, "B")])} if split and per_stage[(s, "B")] else {})}
                   for s in range(schedule.num_model_stages)]  # BW: a whole backward a split schedule keeps
    fixed = {"F": 1.0, "B": 1.0, "W": 1.0, "post": statistics.mean(post)}
    simulated = simulate(schedule, fixed, stage_costs).makespan + statistics.median(optimizer)
    from_profiles = {}
    for source in ("replay", "alone") if runs[0][0]["profiles"] else ():
        costs = _profiled_stage_costs(runs, source, schedule.num_model_stages, split)
        from_profiles[source] = (simulate(schedule, fixed, costs).makespan + statistics.median(optimizer)) * 1e3
    return {"measured_ms": statistics.median(steps) * 1e3, "simulated_ms": simulated * 1e3,
            "from_profiles_ms": from_profiles,
            "post_ms": statistics.mean(post) * 1e3, "stage_costs_ms": [{k: c * 1e3 for k, c in s.items()}
                                                                        for s in stage_costs], "ranks": ranks}


def _profiled_stage_costs(runs: list[list[dict]], source: str, stages: int, split: bool) -> list[dict]:
    """The simulator's per-stage costs from one profile source, the mean over rounds (a stage is profiled
    on the rank that holds it); with ``BW`` where a split schedule keeps whole backwards."""
    out = []
    for stage in range(stages):
        measured = [worker["profiles"][source][stage] for by_rank in runs for worker in by_rank
                    if stage in worker["profiles"][source]]
        chunk = ChunkCost(**{k: statistics.mean(m[k] for m in measured) for k in measured[0]})
        out.append(chunk.stage_costs(split))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="*", default=["zb_h1", "zb_v"])
    parser.add_argument("--workload", default="compute-bound", choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profiles", action="store_true",
                        help="also profile each rank's ops (stream replay, chunks alone) and simulate from them")
    parser.add_argument("--cpu-clock", action="store_true", help="time ops in thread CPU seconds")
    parser.add_argument("--out", default="benchmarks/results/trace_schedules.json")
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    load = os.getloadavg()[0]
    raw: dict[str, list] = {name: [] for name in args.schedules}
    for _ in range(args.rounds):  # alternate schedules so machine noise hits all of them alike
        for name in args.schedules:
            raw[name].append(run_local(_traced_steps, STAGES, (w, name, args.steps, args.profiles, args.cpu_clock),
                                       timeout_s=600))
    report = {name: summarise(name, rounds, w["micro_batches"]) for name, rounds in raw.items()}
    for name, r in report.items():
        print(f"{name}: measured {r['measured_ms']:.1f} ms/step, simulated from its own op costs "
              f"{r['simulated_ms']:.1f} ({r['simulated_ms'] / r['measured_ms'] - 1:+.0%}), post {r['post_ms']:.2f} ms")
        for source, ms in r["from_profiles_ms"].items():
            print(f"  from the {'stream replay' if source == 'replay' else 'chunks alone'}: {ms:.1f} ms "
                  f"({ms / r['measured_ms'] - 1:+.1%} vs measured, "
                  f"{ms / r['simulated_ms'] - 1:+.1%} vs its own op costs)")
        for rank, rr in enumerate(r["ranks"]):
            kinds = "  ".join(f"{k} {t:.1f}" for k, t in sorted(rr["ms_by_kind"].items()))
            print(f"  rank {rank}: {kinds} ms net; waits {rr['wait_ms']:.1f} ms, "
                  f"{rr['blocked_receives']:.0f} receives blocked, {rr['transfer_instructions']:.0f} transfers posted")
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "workload": args.workload, "load_average": load,
                   "cpu_clock": args.cpu_clock,
                   "report": report}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
