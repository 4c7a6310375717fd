"""pipegrid against torch.distributed.pipelining and one process, in one run, on CPU gloo.

The model is a stack of 8 residual MLP blocks ``x + fc2(relu(fc1(x)))`` (fc1: h -> 4h)
trained with Adam (torch's fused kernel in every system: pipegrid's default, passed
explicitly to the others), cut into pipe=2 stages. Two workloads: overhead-bound (h=64,
micro-batch 4, 16 micro-batches) and compute-bound (h=512, micro-batch 16, 8
micro-batches). Systems run alternately, round after round, each in freshly forked
processes with one thread each; the table reports medians over rounds. On the
overhead-bound workload pipegrid also runs 1F1B with ``schedule.coalesce`` = 2 and 4
(that many micro-batches per message, each still computed on its own). The V schedules
(torch's ``ScheduleZBVZeroBubble``/``ScheduleDualPipeV``, pipegrid's zb_v/dualpipev) cut
the blocks into 4 chunks, rank r holding chunks r and 3-r. Two baselines bound what a
pipeline can reach: one process's time halved (the no-bubble limit) and two processes
each training half the blocks at once with no messages (what this machine gives two busy
processes).

    python benchmarks/vs_torch_pipelining.py [--rounds 5] [--out benchmarks/results/vs_torch_pipelining.json]
    python benchmarks/vs_torch_pipelining.py --quick   # compute-bound, QUICK_SYSTEMS, 3 rounds: < 3 minutes
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

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked workers inherit it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.schedules import SCHEDULES  # noqa: E402
from pipegrid.topology.affinity import bind_cores  # noqa: E402

WORKLOADS = {
    "overhead-bound": {"hidden": 64, "micro_batch": 4, "micro_batches": 16, "steps": 30},
    "compute-bound": {"hidden": 512, "micro_batch": 16, "micro_batches": 8, "steps": 4},
}
BLOCKS, STAGES, WARMUP = 8, 2, 3
ADAM = {"lr": 1e-4, "fused": True}  # one optimizer for every system


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _data(w: dict, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(w["micro_batch"], w["hidden"], generator=gen),
             torch.randn(w["micro_batch"], w["hidden"], generator=gen)) for _ in range(w["micro_batches"])]


def _timed(step_fn, w: dict, sync) -> float:
    """Seconds per step over w['steps'] steps after WARMUP, timed between barriers."""
    for step in range(WARMUP):
        step_fn(_data(w, step))
    batches = [_data(w, WARMUP + s) for s in range(w["steps"])]
    sync()
    start = time.perf_counter()
    for batch in batches:
        step_fn(batch)
    sync()
    return (time.perf_counter() - start) / w["steps"]


def one_process(w: dict, blocks: int = BLOCKS) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(w["hidden"]) for _ in range(blocks)])
    opt = torch.optim.Adam(model.parameters(), **ADAM)

    def step(batch):
        for x, y in batch:
            (nn.functional.mse_loss(model(x), y) / len(batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(step, w, lambda: None)


def halves_side_by_side(w: dict) -> float:
    """Each of the 2 processes trains half the blocks on every micro-batch, no messages:
    the no-bubble limit as this machine runs two busy processes at once (bound to a core
    each, as pipegrid binds them), rather than one process's time halved."""
    bind_cores()
    dist.barrier()
    return one_process(w, BLOCKS // STAGES)


def torch_pipelining(w: dict, schedule_name: str, bind: bool = False) -> float:
    """torch's schedule: one stage per rank, or (zbv, dualpipev) two placed in a V, rank r
    holding stages r and 2p-1-r, as torch's V schedules require."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                              ScheduleZBVZeroBubble)

    if bind:  # what pipegrid does by default (comm.bind_cores), to show its share of the gain
        bind_cores()
    rank = dist.get_rank()
    v_shaped = schedule_name in ("zbv", "dualpipev")
    stages_here = [rank, 2 * STAGES - 1 - rank] if v_shaped else [rank]
    num_stages = STAGES * len(stages_here)
    per = BLOCKS // num_stages
    torch.manual_seed(0)
    blocks = [Block(w["hidden"]) for _ in range(BLOCKS)]
    mods = [nn.Sequential(*blocks[s * per:(s + 1) * per]) for s in stages_here]
    stages = [PipelineStage(mod, s, num_stages, torch.device("cpu")) for mod, s in zip(mods, stages_here)]
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "zbv": ScheduleZBVZeroBubble,
           "dualpipev": ScheduleDualPipeV}[schedule_name]
    schedule = cls(stages if v_shaped else stages[0], n_microbatches=w["micro_batches"],
                   loss_fn=nn.functional.mse_loss)
    opt = torch.optim.Adam([p for mod in mods for p in mod.parameters()], **ADAM)
    first, last = 0 in stages_here, num_stages - 1 in stages_here

    def step(batch):
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        if first and last:  # the V: rank 0 feeds the inputs and takes the loss
            schedule.step(x, target=y, losses=[])
        elif first:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=[])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(step, w, dist.barrier)


def pipegrid_run(w: dict, schedule_name: str, coalesce: int = 1) -> float:
    topo = pg.Topology(pipe=STAGES)
    chunks = (SCHEDULES[schedule_name].chunks or (1,))[0]  # zb_v, dualpipev: 2, placed in a V
    model = pg.PipelineModule([pg.LayerSpec(Block, w["hidden"]) for _ in range(BLOCKS)],
                              loss_fn=nn.functional.mse_loss, topology=topo, partition_method="uniform",
                              virtual_stages=chunks, stage_placement="v" if chunks == 2 else "loop")
    engine = pg.initialize(model, {"topology": {"pipe": STAGES},
                                   "schedule": {"name": schedule_name, "micro_batches": w["micro_batches"],
                                                "coalesce": coalesce},
                                   "optimizer": {"_target_": "torch.optim.Adam", **ADAM}})
    return _timed(lambda batch: engine.train_batch(iter(batch)), w, dist.barrier)


SYSTEMS = {
    "one process": (one_process, 1, ()),
    "two halves side by side": (halves_side_by_side, STAGES, ()),
    "torch Schedule1F1B": (torch_pipelining, STAGES, ("1f1b",)),
    "torch ScheduleGPipe": (torch_pipelining, STAGES, ("gpipe",)),
    "torch ScheduleZBVZeroBubble": (torch_pipelining, STAGES, ("zbv",)),
    "torch ScheduleDualPipeV": (torch_pipelining, STAGES, ("dualpipev",)),
    "torch Schedule1F1B, cores bound": (torch_pipelining, STAGES, ("1f1b", True)),
    "pipegrid 1f1b": (pipegrid_run, STAGES, ("1f1b",)),
    "pipegrid gpipe": (pipegrid_run, STAGES, ("gpipe",)),
    "pipegrid zb_h1": (pipegrid_run, STAGES, ("zb_h1",)),
    "pipegrid zb_v": (pipegrid_run, STAGES, ("zb_v",)),
    "pipegrid dualpipev": (pipegrid_run, STAGES, ("dualpipev",)),
    "pipegrid 1f1b coalesce=2": (pipegrid_run, STAGES, ("1f1b", 2)),
    "pipegrid 1f1b coalesce=4": (pipegrid_run, STAGES, ("1f1b", 4)),
}
# grouping micro-batches into messages pays where a message costs more than a
# micro-batch's compute; on the compute-bound workload it only lengthens the bubble
ONLY_ON = {"pipegrid 1f1b coalesce=2": "overhead-bound", "pipegrid 1f1b coalesce=4": "overhead-bound"}
# the zero-bubble question of issue 27 (is zb_v faster than zb_h1, and than torch's ZBV?) in one short run
QUICK_SYSTEMS = ["two halves side by side", "torch Schedule1F1B", "torch ScheduleZBVZeroBubble", "pipegrid 1f1b",
                 "pipegrid zb_h1", "pipegrid zb_v"]


def measure(workload: str, rounds: int, systems: list[str]) -> dict[str, list[float]]:
    w = WORKLOADS[workload]
    systems = [name for name in systems if ONLY_ON.get(name, workload) == workload]
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):  # alternate systems so machine noise hits all of them alike
        for name in systems:
            fn, world, args = SYSTEMS[name]
            times[name].append(run_local(fn, world, (w, *args), timeout_s=600)[0])
    return times


def report(results: dict) -> str:
    """Medians (and the range over rounds); "/ limit": against one process's time halved, the
    no-bubble limit; "/ halves": against two processes each training half the model at once."""
    lines = ["| workload | system | ms/step (median) | rounds min-max | vs torch 1F1B | / limit | / halves |",
             "|---|---|---|---|---|---|---|"]
    for workload, times in results.items():
        med = {name: statistics.median(ts) for name, ts in times.items()}
        limit = med["one process"] / STAGES if "one process" in med else None
        halves = med.get("two halves side by side")
        for name, t in med.items():
            cells = [f"{t / base:.2f}" if base and name != base_name else ""
                     for base, base_name in ((med.get("torch Schedule1F1B"), "torch Schedule1F1B"),
                                             (limit, "one process"), (halves, "two halves side by side"))]
            spread = f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"
            lines.append(f"| {workload} | {name} | {t * 1e3:.1f} | {spread} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    parser.add_argument("--out", default="benchmarks/results/vs_torch_pipelining.json")
    parser.add_argument("--quick", action="store_true",
                        help="compute-bound only, QUICK_SYSTEMS, 3 rounds unless --rounds says otherwise")
    args = parser.parse_args()
    if args.quick:
        args.workloads, args.systems = ["compute-bound"], QUICK_SYSTEMS
        args.rounds = 3 if "--rounds" not in sys.argv else args.rounds
    load_before = os.getloadavg()
    results = {wl: measure(wl, args.rounds, args.systems) for wl in args.workloads}
    table = report(results)
    print(table)
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor() or
                   platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "rounds": args.rounds,
                   "load_average": [load_before, os.getloadavg()], "workloads": WORKLOADS,
                   "seconds_per_step": results, "table": table}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
