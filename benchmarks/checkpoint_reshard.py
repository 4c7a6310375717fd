"""Two ways to make ZeRO-1 optimizer state loadable at any layout, measured side by side.

* ``shards`` (what pipegrid does, ``pipegrid.pipe.checkpoint``): each rank writes its
  shard as it is, with every parameter's element range listed in the manifest; at load a
  rank reassembles its parameters from the pieces of the shard files that hold them.
* ``per_layer`` (the alternative, prototyped here): at save time each layer's state is
  gathered whole (one layer at a time, summed onto one data rank) and written to that
  layer's file; at load a rank reads the files of the parameters its stage or shard needs.

Both load through the same ``ZeroOptimizer.load_param_states`` / ``ReplicatedOptimizer``
code, so only the save and the file layout differ. A 16-block residual MLP (h=128, 1.05M
parameters, 4.2 MB of fp32 weights, Adam) is saved at pipe=1 x data=2 with ZeRO-1, and
loaded at the same layout and at pipe=2 x data=1 without ZeRO. Peak memory is the rise of
each rank's resident set (VmHWM after ``clear_refs``) over its size before the save/load.

    python benchmarks/checkpoint_reshard.py [--rounds 3] [--out benchmarks/results/checkpoint_reshard.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402
from pipegrid.pipe import checkpoint as ckpt  # noqa: E402
from pipegrid.pipe.checkpoint import engine_state  # noqa: E402
from pipegrid.pipe.checkpoint.optimizer_shards import write_optimizer_shard  # noqa: E402
from pipegrid.pipe.zero import MASTER, ParamState  # noqa: E402

from benchmarks.memory import Block  # noqa: E402  (x + fc2(relu(fc1(x))), fc1: h -> 2h)
from benchmarks.record import write_record  # noqa: E402

HIDDEN, BLOCKS = 128, 16
SAVE_AT, LOAD_AT = (1, 2, 1), [(1, 2, 1), (2, 1, 0)]  # (pipe, data, zero.stage)


def _engine(layout: tuple[int, int, int]) -> pg.PipelineEngine:
    pipe, data, zero = layout
    model = pg.PipelineModule([pg.LayerSpec(Block, HIDDEN) for _ in range(BLOCKS)], loss_fn=nn.functional.mse_loss,
                              topology=pg.Topology(pipe=pipe, data=data))
    return pg.initialize(model, {"zero": {"stage": zero}, "schedule": {"micro_batches": 2},
                                 "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}})


def _memory() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _measured(action) -> tuple[float, int]:
    """(seconds, peak resident-set rise in bytes) of ``action()`` on this rank, between barriers."""
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before, start = _memory()["VmRSS"], time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    dist.barrier()
    return seconds, _memory()["VmHWM"] - before


def _layer_params(engine) -> list[tuple[str, list[tuple[str, int]]]]:
    """(weights file, [(parameter name, index in engine.params)]) of every layer with parameters."""
    index = {id(p): i for i, p in enumerate(engine.params)}
    files = engine_state._stage_files(engine, tied_on_every_owner=True)
    return [(name, [(n, index[id(p)]) for n, p in layer.named_parameters()]) for name, layer in files]


def _gather_layer(zero, indices: list[int], dst: int) -> list[ParamState] | None:
    """The per_layer prototype's collective: every rank's piece of these parameters' state,
    in a zeroed buffer spanning them, summed onto data rank ``dst``."""
    keys, state = zero.elementwise_keys(), zero.optimizer.state.get(zero.shard, {})
    first = min(zero.layout.offsets[i] for i in indices)
    last = max(zero.layout.offsets[i] + zero.layout.numels[i] for i in indices)
    span = torch.zeros(len(keys), last - first, dtype=zero.shard.dtype)
    (lo, _), start, end = zero._range, max(first, zero._range[0]), min(last, zero._range[1])
    for row, key in zip(span, keys):
        source = zero.shard.detach() if key == MASTER else state[key]
        if start < end:
            row[start - first:end - first].copy_(source[start - lo:end - lo])
    dist.reduce(span, dst=dist.get_global_rank(zero.group, dst), group=zero.group)
    if zero.data_rank != dst:
        return None
    scalars = {k: v.clone() for k, v in state.items() if k not in keys}
    return [ParamState({k: row[zero.layout.offsets[i] - first:][:zero.layout.numels[i]].clone()
                        for k, row in zip(keys, span)}, scalars) for i in indices]


def _save_per_layer(engine, directory: str) -> None:
    for k, (name, params) in enumerate(_layer_params(engine)):
        writer = k % engine.topology.data
        states = _gather_layer(engine.zero, [i for _, i in params], writer)
        if states is not None:
            entries = {n: {"elementwise": s.elementwise, "scalars": s.scalars} for (n, _), s in zip(params, states)}
            ckpt.save_file({"params": entries}, os.path.join(directory, f"optim_{name}"))


def _load_per_layer(engine, directory: str, hyperparameters: dict) -> None:
    where = {i: (f"optim_{name}", n) for name, params in _layer_params(engine) for n, i in params}
    opened: dict[str, dict] = {}

    def read(index: int) -> ParamState:
        name, param = where[index]
        if name not in opened:
            opened[name] = ckpt.load_file(os.path.join(directory, name), mmap=True)["params"]
        return ParamState(opened[name][param]["elementwise"], opened[name][param]["scalars"])

    engine.zero.load_param_states(read, hyperparameters)


def _save_shards(engine, directory: str) -> None:
    keys = ckpt.parameter_keys(engine, tied_on_every_owner=False)
    index = write_optimizer_shard(engine.zero, engine.params, keys, engine.groups.coord, engine.topology.data,
                                  directory)
    if dist.get_rank() == 0:
        ckpt.atomic_write_text(os.path.join(directory, ckpt.MANIFEST), json.dumps({"optimizer_shards": index}))


def _load_shards(engine, directory: str) -> None:
    manifest = ckpt.read_manifest(directory)
    engine_state._load_optimizer_states(engine, directory, None, manifest, ckpt.parameter_keys(engine))


def _save(approach: str, directory: str) -> tuple[float, int]:
    engine = _engine(SAVE_AT)
    x = torch.randn(8, HIDDEN)
    engine.train_batch(iter([(x, x)] * 2))  # Adam's state exists after a step
    if dist.get_rank() == 0:
        group = {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"}
        ckpt.save_file({"hyperparameters": group, "scaler": engine.scaler.state_dict(), "lr_scheduler": None},
                       os.path.join(directory, ckpt.OPTIMIZER))
    save = _save_per_layer if approach == "per_layer" else _save_shards
    return _measured(lambda: save(engine, directory))


def _load(approach: str, directory: str, layout: tuple[int, int, int]) -> tuple[float, int, float]:
    engine = _engine(layout)
    if approach == "per_layer":
        hyperparameters = ckpt.load_file(os.path.join(directory, ckpt.OPTIMIZER))["hyperparameters"]
        seconds, peak = _measured(lambda: _load_per_layer(engine, directory, hyperparameters))
    else:  # (pipegrid's loader reads the hyperparameters itself)
        seconds, peak = _measured(lambda: _load_shards(engine, directory))
    checksum = sum(float(v.double().abs().sum()) for s in engine.optimizer.state.values() for v in s.values())
    return seconds, peak, checksum


def _round(approach: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="reshard-") as directory:
        saved = run_local(_save, SAVE_AT[0] * SAVE_AT[1], (approach, directory), timeout_s=300)
        written = [p for p in glob.glob(os.path.join(directory, "optim_*"))]
        row = {"save_s": max(s for s, _ in saved), "save_peak": max(p for _, p in saved),
               "bytes": sum(os.path.getsize(p) for p in written), "files": len(written)}
        for layout in LOAD_AT:
            loaded = run_local(_load, layout[0] * layout[1], (approach, directory, layout), timeout_s=300)
            tag = "x".join(map(str, layout))
            row.update({f"load_{tag}_s": max(s for s, _, _ in loaded), f"load_{tag}_peak": max(p for _, p, _ in loaded),
                        f"checksum_{tag}": sum(c for _, _, c in loaded)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/checkpoint_reshard.json")
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {"per_layer": [], "shards": []}
    for _ in range(args.rounds):  # alternate, so both see the same machine
        for approach in rounds:
            rounds[approach].append(_round(approach))
    medians = {a: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for a, rows in rounds.items()}
    assert all(medians["per_layer"][k] == medians["shards"][k] for k in medians["shards"] if k.startswith("checksum"))
    columns = [("save ms", "save_s", 1e3), ("save peak MiB", "save_peak", 2**-20), ("MiB on disk", "bytes", 2**-20),
               ("files", "files", 1)]
    for layout in LOAD_AT:
        tag = "x".join(map(str, layout))
        columns += [(f"load {tag} ms", f"load_{tag}_s", 1e3), (f"load {tag} peak MiB", f"load_{tag}_peak", 2**-20)]
    lines = ["| format | " + " | ".join(c for c, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for approach, m in medians.items():
        lines.append(f"| {approach} | " + " | ".join(f"{m[k] * scale:.1f}" for _, k, scale in columns) + " |")
    print(f"optimizer state of a {BLOCKS}-block MLP (h={HIDDEN}), Adam, saved at pipe x data x zero = "
          f"{'x'.join(map(str, SAVE_AT))}; medians of {args.rounds} rounds (load AxBxC = pipe x data x zero)")
    print("\n".join(lines))
    write_record(args.out, [{"format": a, **m} for a, m in medians.items()], lines, hidden=HIDDEN, blocks=BLOCKS,
                 save_at=SAVE_AT, load_at=LOAD_AT, rounds=rounds)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
