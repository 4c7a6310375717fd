"""Compiled stages against eager ones on CPU gloo, per schedule, side by side in one run; and how much
of the weight-gradient work a split backward still defers to W under compile.

The model is 8 pre-norm transformer blocks (LayerNorm, causal SDPA attention, GELU MLP; hidden 256,
4 heads, sequence 64, micro-batch 4, 8 micro-batches) cut into pipe=2 stages (zb_v: 4 chunks in a V),
trained with Adam. Systems run alternately, round after round, each in freshly forked processes with one
thread each; compiling happens in the warm-up steps (inductor's on-disk cache makes later rounds'
compiles quick), the table reports median ms/step over rounds. ``compile`` is inductor with
``compile.eager_linear`` at its default (on for zb_h1 and zb_v, so W keeps the Linear weights).

The split table runs one stage (4 blocks) in one process: the plain backward, I and W, eager and compiled
(with and without eager_linear), and the share of the parameters (elements) whose gradients W computes.

    python benchmarks/compile_speed.py [--rounds 3] [--out benchmarks/results/compile_speed.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked workers inherit it
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile pool per worker on 2 cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from pipegrid.conf.schema import CompileConfig  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.pipe.compile import compile_stages  # noqa: E402
from pipegrid.pipe.split_backward import backward_input, backward_weight  # noqa: E402
from pipegrid.schedules import SCHEDULES  # noqa: E402

HIDDEN, HEADS, SEQ, MICRO_BATCH, MICRO_BATCHES = 256, 4, 64, 4, 8
BLOCKS, STAGES, WARMUP, STEPS = 8, 2, 3, 5
SCHEDULE_NAMES = ("1f1b", "zb_h1", "zb_v")


class Block(nn.Module):
    """Pre-norm causal self-attention + GELU MLP: (B, T, C) -> (B, T, C)."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, c = h.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(h)).split(c, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        h = h + self.proj(y)
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


def _data(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(MICRO_BATCH, SEQ, HIDDEN, generator=gen), torch.randn(MICRO_BATCH, SEQ, HIDDEN, generator=gen))
            for _ in range(MICRO_BATCHES)]


def pipegrid_run(schedule_name: str, compiled: bool) -> float:
    """Seconds per step over STEPS steps after WARMUP (where compiling happens), between barriers."""
    chunks = (SCHEDULES[schedule_name].chunks or (1,))[0]
    model = pg.PipelineModule([pg.LayerSpec(Block) for _ in range(BLOCKS)], loss_fn=F.mse_loss,
                              topology=pg.Topology(pipe=STAGES), partition_method="uniform", virtual_stages=chunks,
                              stage_placement="v" if chunks == 2 else "loop")
    engine = pg.initialize(model, {"topology": {"pipe": STAGES},
                                   "schedule": {"name": schedule_name, "micro_batches": MICRO_BATCHES},
                                   "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4},
                                   "compile": {"enabled": compiled}})
    for step in range(WARMUP):
        engine.train_batch(iter(_data(step)))
    batches = [_data(WARMUP + s) for s in range(STEPS)]
    dist.barrier()
    start = time.perf_counter()
    for batch in batches:
        engine.train_batch(iter(batch))
    dist.barrier()
    return (time.perf_counter() - start) / STEPS


def measure(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # alternate systems so machine noise hits all of them alike
        for name in SCHEDULE_NAMES:
            for compiled in (False, True):
                key = f"{name} {'compiled' if compiled else 'eager'}"
                times.setdefault(key, []).append(run_local(pipegrid_run, STAGES, (name, compiled), timeout_s=900)[0])
    return times


def split_shares(repeats: int) -> list[dict]:
    """One stage of BLOCKS // 2 blocks: plain backward, I and W in ms (median), and W's parameter share."""
    rows = []
    for label, section in (("eager", None), ("compiled, eager_linear", {"eager_linear": True}),
                           ("compiled, whole blocks", {"eager_linear": False})):
        torch.manual_seed(0)
        stage = pg.PipelineModule([pg.LayerSpec(Block) for _ in range(BLOCKS // STAGES)], loss_fn=F.mse_loss)
        if section is not None:
            compile_stages(stage, CompileConfig(enabled=True, **section), split_backward=True)
        params = list(stage.parameters())
        full, first, second, share = [], [], [], 0.0
        for step in range(WARMUP + repeats):
            (x, _), = _data(step)[:1]
            x.requires_grad_()
            out = stage(x)
            start = time.perf_counter()
            out.backward(torch.ones_like(out))
            full.append(time.perf_counter() - start)
            x = x.detach().requires_grad_()
            out = stage(x)
            start = time.perf_counter()
            _, state = backward_input([out], [torch.ones_like(out)], [x], params)
            middle = time.perf_counter()
            share = sum(p.numel() for p in state.deferred_params) / sum(p.numel() for p in params)
            backward_weight(state)
            first.append(middle - start)
            second.append(time.perf_counter() - middle)
        med = {name: statistics.median(ts[WARMUP:]) * 1e3 for name, ts in (("backward_ms", full), ("input_ms", first),
                                                                           ("weight_ms", second))}
        rows.append({"stage": label, **med, "deferred_parameter_share": share})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/compile_speed.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    times = measure(args.rounds)
    shares = split_shares(repeats=5)  # after the workers: a process must not fork once inductor compiled in it
    load_after = os.getloadavg()
    med = {key: statistics.median(ts) for key, ts in times.items()}
    table = ["| schedule | eager ms/step | compiled ms/step | compiled / eager | rounds (eager; compiled) |",
             "|---|---|---|---|---|"]
    rows = []
    for name in SCHEDULE_NAMES:
        eager, compiled = med[f"{name} eager"], med[f"{name} compiled"]
        spread = "; ".join(", ".join(f"{t * 1e3:.0f}" for t in times[f"{name} {kind}"]) for kind in ("eager", "compiled"))
        table.append(f"| {name} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} | {compiled / eager:.2f} | {spread} |")
        rows.append({"schedule": name, "eager_s": times[f"{name} eager"], "compiled_s": times[f"{name} compiled"]})
    table += ["", "| one stage, split backward | plain backward ms | I ms | W ms | parameters W computes |",
              "|---|---|---|---|---|"]
    table += [f"| {r['stage']} | {r['backward_ms']:.1f} | {r['input_ms']:.1f} | {r['weight_ms']:.1f} | "
              f"{r['deferred_parameter_share']:.1%} |" for r in shares]
    print("\n".join(table))
    print(f"load average before {load_before}, after {load_after}")
    write_record(args.out, rows + shares, table, rounds=args.rounds, threads=1, load_before=load_before,
                 load_after=load_after, model=f"{BLOCKS} blocks, hidden {HIDDEN}, seq {SEQ}, micro-batch {MICRO_BATCH}, "
                                              f"{MICRO_BATCHES} micro-batches, pipe {STAGES}, inductor")


if __name__ == "__main__":
    main()
