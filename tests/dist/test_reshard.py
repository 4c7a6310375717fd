"""Resuming at another layout, optimizer state included (checkpoint format 2).

Checkpoints written at pipe x data x ZeRO = 2 x 2 x 1, 4 x 1 x 0, 1 x 4 x 2 and 1 x 4 x 3 resume at the
other layouts (pipe 2 <-> 4, data 2 -> 1, 1 -> 2, 2 <-> 4, ZeRO 0 <-> 1 <-> 2, 3 <-> 1) and continue the
run that never stopped: the plain-torch reference training all steps with Adam. The weights
alone (``load_optimizer_states=False``), saved at 2 x 2 x 1 and loaded at pipe 4, come back
bit for bit and train on like the reference started from them with a fresh optimizer. A load
at one layout followed by a save reproduces every saved value bit for bit (bf16 master
weights included; the tensor-parallel GPT too), however differently the new layout
shards it. Format-1 checkpoints (optimizer state per rank) still resume at
their own layout and are refused, with the fix named, at another.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

import pipegrid as pg
from examples.models.gpt import GPT
from pipegrid.launch import run_local
from pipegrid.pipe import checkpoint as ckpt
from tests.support.engine_cases import N_LAYER, assert_matches_reference, canonical_state, config, global_batches
from tests.support.models import TinyGPT
from tests.support.reference import PlainGPT, PlainTinyGPT, load_named, train
from tests.support.tensor_gpt import GPT_CFG

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}  # eps: see test_zero_precision.py
GLOBAL_MICRO_BATCHES = 4  # the same global batch at every data degree
BEFORE, AFTER = 2, 2  # steps before the save, steps after the resume
RESUMES = [((2, 2, 1), (4, 1, 0)), ((2, 2, 1), (1, 4, 1)), ((4, 1, 0), (2, 2, 1)),  # (pipe, data, zero) from -> to
           ((1, 4, 2), (2, 2, 1)), ((2, 2, 1), (1, 4, 2)),  # ZeRO-2 <-> ZeRO-1 at another data and pipe degree
           ((1, 4, 3), (2, 2, 1)), ((2, 2, 1), (1, 4, 3))]  # ZeRO-3 <-> ZeRO-1
WEIGHTS_ONLY = ((2, 2, 1), (4, 1, 0))  # saved at -> loaded at, load_optimizer_states=False


def _config(layout: tuple[int, int, int], dtype: str = "float32") -> dict:
    pipe, data, zero = layout
    return config("1f1b", pipe, data, GLOBAL_MICRO_BATCHES // data, dtype=dtype, optimizer=ADAM,
                  zero={"stage": zero})


def _engine(layout, dtype="float32", directory=None):
    cfg = _config(layout, dtype)
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=layout[0], data=layout[1])), cfg)
    if directory is not None:
        assert engine.load_checkpoint(directory) == BEFORE
    return engine


def _tensor_parallel_engine(layout, directory=None):
    """The example GPT split over tensor=2, at (pipe, data, zero)."""
    pipe, data, zero = layout
    cfg = config("1f1b", pipe, data, GLOBAL_MICRO_BATCHES // data, optimizer=ADAM, zero={"stage": zero})
    cfg["topology"]["tensor"] = 2
    groups = pg.init_distributed(cfg)
    model = GPT(GPT_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    engine = pg.initialize(model, cfg, groups=groups)
    if directory is not None:
        assert engine.load_checkpoint(directory) == BEFORE
    return engine


def _train(engine, until):
    topo, m = engine.topology, engine.config.schedule.micro_batches
    d = topo.coord(dist.get_rank()).data
    losses = [engine.train_batch(iter(global_batches(s, topo.data, m)[d * m:(d + 1) * m]))
              for s in range(engine.global_steps, until)]
    engine.gather_parameters()  # (ZeRO-3 frees them after each step; the caller reads them)
    return losses


def _write_format_1(engine, directory):
    """Turn the newest checkpoint into what pipegrid wrote before format 2: one optimizer
    file per rank ({"zero": the wrapper's state_dict, "scaler", "lr_scheduler"}), no "format"."""
    path, zero, coord = ckpt.latest_step_dir(directory), engine.zero, engine.groups.coord
    state = {"optimizer": zero.optimizer.state_dict()}
    if zero.sharded:
        state.update(shard=zero.shard.detach().clone(), data_rank=coord.data, data_size=engine.topology.data)
    name = ckpt.legacy_optim_file(coord.pipe, coord.data if zero.sharded else 0, coord.tensor)
    torch.save({"zero": state, "scaler": engine.scaler.state_dict(), "lr_scheduler": None}, os.path.join(path, name))
    dist.barrier()
    if dist.get_rank() == 0:
        for file in os.listdir(path):
            if file.startswith("optim_") or file == ckpt.OPTIMIZER:
                os.remove(os.path.join(path, file))
        manifest = ckpt.read_manifest(path)
        del manifest["format"]
        with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
            json.dump(manifest, f)
    dist.barrier()


def _all_cases(root):
    """On each of 4 ranks: the saves, the resumes, the round trips and format 1, in turn."""
    out = {"saved": {}, "saved_state": {}, "resumed": {}}
    for layout in {source for source, _ in RESUMES}:
        engine = _engine(layout)
        out["saved"][layout] = _train(engine, BEFORE)
        out["saved_state"][layout] = canonical_state(engine.module)
        engine.save_checkpoint(os.path.join(root, f"fp32-{layout}"))
    for source, target in RESUMES:
        engine = _engine(target, directory=os.path.join(root, f"fp32-{source}"))
        out["resumed"][(source, target)] = {"losses": _train(engine, BEFORE + AFTER),
                                            "state": canonical_state(engine.module)}
    engine = _engine(WEIGHTS_ONLY[1])  # the weights alone: a fresh optimizer
    assert engine.load_checkpoint(os.path.join(root, f"fp32-{WEIGHTS_ONLY[0]}"), load_optimizer_states=False) == BEFORE
    loaded = canonical_state(engine.module)
    out["weights_only"] = {"loaded": loaded, "losses": _train(engine, BEFORE + AFTER),
                           "state": canonical_state(engine.module)}
    for dtype in ("float32", "bfloat16"):  # save at 2x2 ZeRO-1, load and save again at 4x1 and 1x4
        engine = _engine((2, 2, 1), dtype)
        _train(engine, BEFORE)
        engine.save_checkpoint(os.path.join(root, f"trip-{dtype}"))
        for target in ((4, 1, 0), (1, 4, 1)):
            _engine(target, dtype, os.path.join(root, f"trip-{dtype}")).save_checkpoint(
                os.path.join(root, f"trip-{dtype}-{target}"))
    engine = _tensor_parallel_engine((2, 1, 0))  # tensor=2: pipe 2 -> 1, data 1 -> 2, ZeRO off -> on
    _train(engine, BEFORE)
    engine.save_checkpoint(os.path.join(root, "trip-tensor2"))
    _tensor_parallel_engine((1, 2, 1), os.path.join(root, "trip-tensor2")).save_checkpoint(
        os.path.join(root, "trip-tensor2-(1, 2, 1)"))
    out["format_1"] = _format_1(os.path.join(root, "format-1"))
    return out


def _format_1(directory):
    engine = _engine((2, 2, 1))
    _train(engine, BEFORE)
    engine.save_checkpoint(directory)
    _write_format_1(engine, directory)
    resumed = _engine((2, 2, 1), directory=directory)
    result = {"losses": _train(resumed, BEFORE + AFTER), "state": canonical_state(resumed.module)}
    try:
        _engine((4, 1, 0), directory=directory)
    except ckpt.CheckpointError as error:
        result["refused"] = str(error)
    return result


def _reference(model=None, first=0):
    """The plain-torch run of steps ``first`` .. BEFORE + AFTER - 1 (from PlainTinyGPT's start by default)."""
    steps = [global_batches(s, 1, GLOBAL_MICRO_BATCHES) for s in range(first, BEFORE + AFTER)]
    return train(model if model is not None else PlainTinyGPT(N_LAYER), steps, ADAM,
                 grad_clip=_config((1, 1, 0))["train"]["grad_clip"])


def _assert_continues(result, reference, what):
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"][BEFORE:]),
                               rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} losses: {m}")
    for name, value in result["state"].items():
        torch.testing.assert_close(value, reference["state"][name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} parameter {name}: {m}")


def _assert_same_checkpoint(saved, resaved, parameters):
    """The weights files, the shared optimizer file and every parameter's optimizer state
    (assembled from whichever shards hold it; ``parameters`` of them) are equal, bit for bit."""
    names = sorted(n for n in os.listdir(saved) if n.startswith(("layer_", "tied_")) or n == ckpt.OPTIMIZER)
    assert len(names) > 2 and all(os.path.exists(os.path.join(resaved, n)) for n in names)
    for name in names:
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (saved, resaved))
        _assert_same_tree(a, b, name, owned=True)
    a, b = (ckpt.ShardReader(d, ckpt.read_manifest(d)) for d in (saved, resaved))
    assert a.where.keys() == b.where.keys() and len(a.where) == parameters
    for key, pieces in a.where.items():
        numel = max(end for _, end, _ in pieces)
        _assert_same_tree(a.read(key, numel)._asdict(), b.read(key, numel)._asdict(), key, owned=False)


def _assert_same_tree(a, b, where, owned):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}[{key!r}]", owned)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: {a} vs {b}"
        # a weight saved as a view of a ZeRO-1 flat buffer would carry the whole buffer
        assert not owned or a.untyped_storage().nbytes() == a.nbytes, f"{where} was saved with a larger storage"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_resume_at_another_layout(tmp_path):
    """Saves, resumes, round trips and format 1 share one 4-rank run (one start-up)."""
    results = run_local(_all_cases, 4, (str(tmp_path),), timeout_s=240)
    reference = _reference()
    for rank, result in enumerate(results):
        for layout, losses in result["saved"].items():
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"][:BEFORE]),
                                       rtol=1e-5, atol=1e-6)
        for (source, target), resumed in result["resumed"].items():
            _assert_continues(resumed, reference, f"rank {rank} resumed at {target} from {source}")
        _assert_continues(result["format_1"], reference, f"rank {rank} format 1 at its layout")
        assert "keeps its optimizer state per rank (format 1" in result["format_1"]["refused"]
        assert "load_optimizer_states=False" in result["format_1"]["refused"]
    seen = {name for result in results for resumed in result["resumed"].values() for name in resumed["state"]}
    assert seen == set(reference["state"])
    saved = {k: v for result in results for k, v in result["saved_state"][WEIGHTS_ONLY[0]].items()}
    loaded = {k: v for result in results for k, v in result["weights_only"]["loaded"].items()}
    assert saved.keys() == loaded.keys() == set(reference["state"])
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), "weights changed on the way from 2 x 2 to pipe 4"
    fresh = _reference(load_named(PlainTinyGPT(N_LAYER), loaded), first=BEFORE)  # Adam starts again from zero
    assert_matches_reference([result["weights_only"] for result in results], fresh, rtol=1e-5, atol=1e-6)
    for dtype in ("float32", "bfloat16"):
        saved = ckpt.latest_step_dir(str(tmp_path / f"trip-{dtype}"))
        for target in ((4, 1, 0), (1, 4, 1)):
            _assert_same_checkpoint(saved, ckpt.latest_step_dir(str(tmp_path / f"trip-{dtype}-{target}")),
                                    len(list(PlainTinyGPT(N_LAYER).parameters())))
    _assert_same_checkpoint(ckpt.latest_step_dir(str(tmp_path / "trip-tensor2")),  # each tensor rank's parameters
                            ckpt.latest_step_dir(str(tmp_path / "trip-tensor2-(1, 2, 1)")),
                            2 * len(list(PlainGPT(GPT_CFG).parameters())))
