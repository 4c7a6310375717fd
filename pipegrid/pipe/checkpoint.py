"""Checkpoints: one weights file per layer (by global index), optimizer shards, a manifest.

Weights are keyed by layer and optimizer state by parameter (``<layer>/<name>`` and the
element range each shard file holds, listed in the manifest), whatever pipe rank or ZeRO-1
shard held them, so a checkpoint written at one pipe x data degree, ZeRO on or off,
resumes at any other (same tensor degree): each rank reslices what its own parameters
need. Every save goes to a temporary directory that is renamed into place once all
ranks have written, and ``latest`` is replaced atomically, so an interrupted save
leaves the previous checkpoint whole. Files load with ``weights_only=True``: a
checkpoint carrying pickled objects is refused.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.pipe.zero import ParamState

LATEST = "latest"
MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.pt"  # what every rank's optimizer shares: hyperparameters, loss scale, LR scheduler
FORMAT = 2  # 1: optimizer state in one file per rank, loadable only at the layout that wrote it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this model; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def layer_file(index: int, tensor_rank: int) -> str:
    return f"layer_{index:05d}-tp{tensor_rank:02d}.pt"


def tied_file(key: str, tensor_rank: int) -> str:
    return f"tied_{key}-tp{tensor_rank:02d}.pt"


def optim_shard_file(pipe: int, data: int, tensor: int) -> str:
    """One rank's optimizer state: its ZeRO-1 shard, or its share of the replicated state."""
    return f"optim_shard-pp{pipe:03d}-dp{data:03d}-tp{tensor:02d}.pt"


def legacy_optim_file(pipe: int, data: int, tensor: int) -> str:
    """Format 1's per-rank optimizer file."""
    return f"optim-pp{pipe:03d}-dp{data:03d}-tp{tensor:02d}.pt"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def check_writable(directory: str) -> None:
    """Fail before training when checkpoints could not be written."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(f"checkpoint.dir {directory!r} is not writable ({error.strerror}); "
                              "choose a directory you can write to") from None


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_file(obj: Any, path: str) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file.

    Tensors must own their storage (``owned``): torch.save writes a view's whole base.
    """
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: str, previous: str | None = None, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; a missing, truncated or unsafe file names itself.

    ``mmap``: tensors are views of the mapped file, read only where touched; copy what you keep.
    """
    hint = f"; the previous whole checkpoint is {previous}" if previous else ""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - torch raises several types for bad files
        raise CheckpointError(f"cannot load checkpoint file {path}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}{hint}") from None


def latest_step_dir(directory: str) -> str | None:
    """The newest whole checkpoint under ``directory`` (per ``latest``), or None."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(directory, name)
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    whole = whole_checkpoints(directory)  # a save died between moving the old copy and `latest`
    if not whole:
        raise CheckpointError(f"{pointer} names {name}, which has no {MANIFEST}, and no whole checkpoint "
                              f"is left in {directory}; start without checkpoint.dir or point it elsewhere")
    warnings.warn(f"{pointer} names {name}, which is incomplete; loading {whole[-1]}, the newest whole "
                  "checkpoint", RuntimeWarning, stacklevel=2)
    return os.path.join(directory, whole[-1])


def whole_checkpoints(directory: str) -> list[str]:
    """Step directories with a manifest (written last), oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory)
                  if d.startswith("step_") and os.path.exists(os.path.join(directory, d, MANIFEST)))


def previous_whole(directory: str, current: str) -> str | None:
    older = [d for d in whole_checkpoints(directory) if d < os.path.basename(current)]
    return os.path.join(directory, older[-1]) if older else None


def save(directory: str, step: int, rank: int, write_shards: Callable[[str], None],
         manifest: dict[str, Any], barrier: Callable[[], None]) -> str:
    """Collective: every rank writes its shards into a temporary directory, rank 0 publishes it."""
    final = os.path.join(directory, step_dir_name(step))
    tmp = os.path.join(directory, f".tmp-{step_dir_name(step)}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    write_shards(tmp)
    barrier()
    if rank == 0:
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        # a step saved again: move the old copy aside first and delete it only once
        # `latest` names the new one, so some whole checkpoint exists at every instant
        old = os.path.join(directory, f".old-{step_dir_name(step)}")
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(directory, LATEST), step_dir_name(step))
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_manifest(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {os.path.join(path, MANIFEST)}: {error}") from None


def check_same_model(manifest: dict[str, Any], layer_names: list[str], path: str) -> None:
    """Refuse a checkpoint of another model, listing the layers that differ."""
    saved = manifest["layers"]
    if saved == layer_names:
        return
    missing = [f"{i}:{n}" for i, n in enumerate(layer_names) if i >= len(saved) or saved[i] != n]
    unexpected = [f"{i}:{n}" for i, n in enumerate(saved) if i >= len(layer_names) or layer_names[i] != n]
    raise CheckpointError(f"checkpoint {path} is of a different model: layers missing or different here "
                          f"{missing[:10]}, unexpected {unexpected[:10]}; point checkpoint.dir elsewhere")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor that is a view of a larger buffer (a ZeRO-1 flat buffer) copied out."""
    return {k: v.detach().clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in state.items()}


def barrier_fn() -> Callable[[], None]:
    return dist.barrier if dist.is_initialized() and dist.get_world_size() > 1 else (lambda: None)


# --- the engine's checkpoints ---------------------------------------------------------
def _layer_names(module: Any) -> list[str]:
    from pipegrid.pipe.module import _class_name

    return [_class_name(layer) for layer in module.layer_specs]


def _stage_files(engine: Any, tied_on_every_owner: bool) -> list[tuple[str, torch.nn.Module]]:
    """(weights file, module) of the layers on this rank's stages that hold state; a tied
    module once, on its first owner when saving, on every owner when loading."""
    from pipegrid.pipe.spec import TiedLayerSpec

    module, tensor_rank = engine.module, engine.groups.coord.tensor
    files = []
    for stage in module.stage_ids:
        for index, layer in module.local_layers(stage):
            spec = module.layer_specs[index]
            if not isinstance(spec, TiedLayerSpec) and isinstance(layer, torch.nn.Module) and _has_state(layer):
                files.append((layer_file(index, tensor_rank), layer))
    owners = module.tied_pipe_ranks()
    for key, tied in module.tied_modules.items():
        if tied_on_every_owner or owners[key][0] == engine.pipe_rank:
            files.append((tied_file(key, tensor_rank), tied))
    return files


def _has_state(layer: torch.nn.Module) -> bool:
    """Whether the layer has parameters or buffers (cheaper than building its state_dict)."""
    return next(itertools.chain(layer.parameters(), layer.buffers()), None) is not None


def _parameter_keys(engine: Any, tied_on_every_owner: bool = True) -> list[str | None]:
    """Per entry of ``engine.params``, what keys its optimizer state in any layout:
    ``<layer file stem>/<name in the layer>`` (None: a tied copy another rank saves)."""
    keys = {id(p): f"{name[:-len('.pt')]}/{n}" for name, layer in _stage_files(engine, tied_on_every_owner)
            for n, p in layer.named_parameters()}
    return [keys.get(id(p)) for p in engine.params]


def _local_pieces(engine: Any, keys: list[str | None]) -> dict[str, dict[str, Any]]:
    """What this rank writes: ``key -> {"range", "elementwise", "scalars"}``. A ZeRO-1 rank
    writes its shard; without ZeRO the data ranks split the (identical) parameters into
    contiguous runs of about equal size, so every rank writes a share."""
    pieces = [piece for piece in engine.zero.local_param_states() if keys[piece[0]] is not None]
    if not engine.zero.sharded:
        sizes = [p.numel() for p in engine.params]
        starts, total, data = [0, *itertools.accumulate(sizes)], max(sum(sizes), 1), engine.topology.data
        pieces = [piece for piece in pieces if starts[piece[0]] * data // total == engine.groups.coord.data]
    return {keys[i]: {"range": [start, end], "elementwise": state.elementwise, "scalars": state.scalars}
            for i, start, end, state in pieces}


def _write_optimizer_shard(engine: Any, tmp: str, keys: list[str | None]) -> dict[str, dict[str, list[int]]]:
    """Collective: write this rank's pieces; return every rank's ``{file: {key: [start, end]}}``."""
    coord = engine.groups.coord
    name = optim_shard_file(coord.pipe, coord.data, coord.tensor)
    pieces = _local_pieces(engine, keys)
    if pieces:
        save_file({"params": pieces}, os.path.join(tmp, name))
    mine = {name: {key: piece["range"] for key, piece in pieces.items()}} if pieces else {}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {file: ranges for shards in everyone for file, ranges in shards.items()}


def save_engine(engine: Any, directory: str) -> str:
    """Collective: write the engine's whole state as checkpoint ``step_<global_steps>``."""
    coord, rank = engine.groups.coord, engine.groups.rank
    check_writable(directory)
    topo = engine.topology
    manifest = {"format": FORMAT, "step": engine.global_steps, "global_steps": engine.global_steps,
                "skipped_steps": engine.skipped_steps, "consumed_micro_batches": engine.consumed_micro_batches,
                "topology": {"pipe": topo.pipe, "data": topo.data, "tensor": topo.tensor},
                "zero_stage": engine.config.zero.stage, "loss_scale": engine.scaler.scale,
                "layers": _layer_names(engine.module), "client_state": engine.client_state,
                "schedule": engine.config.schedule.name, "world_size": topo.world_size}

    def write_shards(tmp: str) -> None:
        files = _stage_files(engine, tied_on_every_owner=False)
        if coord.data == 0:
            for name, layer in files:
                save_file(owned(layer.state_dict()), os.path.join(tmp, name))
        keys = _parameter_keys(engine, tied_on_every_owner=False)
        # rank 0 writes the manifest after every shard: it lists where each parameter's state is
        manifest["optimizer_shards"] = _write_optimizer_shard(engine, tmp, keys)
        if rank == 0:
            group = {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"}
            save_file({"hyperparameters": group, "scaler": engine.scaler.state_dict(),
                       "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
                      os.path.join(tmp, OPTIMIZER))
        save_file({"rng": rng_state()}, os.path.join(tmp, rank_file(rank)))

    return save(directory, engine.global_steps, rank, write_shards, manifest, barrier_fn())


def load_engine(engine: Any, directory: str, load_optimizer_states: bool = True) -> int | None:
    """Load the newest whole checkpoint under ``directory``; its step, or None when there is none."""
    path = latest_step_dir(directory)
    if path is None:
        return None
    manifest = read_manifest(path)
    check_same_model(manifest, _layer_names(engine.module), path)
    previous = previous_whole(directory, path)
    saved_tensor = manifest["topology"]["tensor"]
    if saved_tensor != engine.topology.tensor:
        raise CheckpointError(f"checkpoint {path} has tensor={saved_tensor} shards per layer, this run has "
                              f"tensor={engine.topology.tensor}; resume with topology.tensor={saved_tensor}")
    files = _stage_files(engine, tied_on_every_owner=True)
    with torch.no_grad():
        for name, layer in files:
            layer.load_state_dict(load_file(os.path.join(path, name), previous))
    same_layout = (manifest["topology"] == {"pipe": engine.topology.pipe, "data": engine.topology.data,
                                            "tensor": engine.topology.tensor}
                   and manifest["zero_stage"] == engine.config.zero.stage)
    if not load_optimizer_states:
        engine.zero.sync_master_from_params()
    elif manifest.get("format", 1) == 1:
        _load_format_1(engine, path, previous, manifest, same_layout)
    else:
        _load_optimizer_states(engine, path, previous, manifest, _parameter_keys(engine))
    rank_path = os.path.join(path, rank_file(engine.groups.rank))
    if same_layout and os.path.exists(rank_path):
        set_rng_state(load_file(rank_path, previous)["rng"])
    engine.global_steps = manifest["global_steps"]
    engine.skipped_steps = manifest["skipped_steps"]
    engine.consumed_micro_batches = manifest["consumed_micro_batches"]
    engine.client_state = dict(manifest.get("client_state") or {})
    return manifest["step"]


class ShardReader:
    """Every parameter's optimizer state from a checkpoint's shard files, whatever layout
    wrote them: the pieces the manifest lists, memory-mapped (only what is read is read)."""

    def __init__(self, path: str, manifest: dict[str, Any], previous: str | None = None) -> None:
        self.path, self.previous = path, previous
        self.where: dict[str, list[tuple[int, int, str]]] = {}
        for file, ranges in manifest["optimizer_shards"].items():
            for key, (start, end) in ranges.items():
                self.where.setdefault(key, []).append((start, end, file))
        self._opened: dict[str, dict[str, Any]] = {}

    def read(self, key: str, numel: int) -> ParamState:
        """The whole state of parameter ``key`` (``numel`` elements), flattened."""
        pieces = sorted(self.where.get(key, []))
        if numel == 0:
            return ParamState({}, {})
        covered = 0
        for start, end, file in pieces:
            if start != covered:
                break
            covered = end
        if covered != numel:
            raise CheckpointError(f"checkpoint {self.path} holds elements {[p[:2] for p in pieces]} of the "
                                  f"optimizer state of {key!r}, which has {numel}; the checkpoint is of another "
                                  "model or incomplete: pass load_optimizer_states=False to load the weights alone")
        states = [self._file(file)[key] for _, _, file in pieces]
        if len(states) == 1:  # whole: hand out the mapped values, the optimizer copies what it keeps
            return ParamState(states[0]["elementwise"], states[0]["scalars"])
        elementwise = {k: torch.cat([s["elementwise"][k] for s in states]) for k in states[0]["elementwise"]}
        return ParamState(elementwise, states[0]["scalars"])

    def _file(self, name: str) -> dict[str, Any]:
        if name not in self._opened:
            self._opened[name] = load_file(os.path.join(self.path, name), self.previous, mmap=True)["params"]
        return self._opened[name]


def _load_optimizer_states(engine: Any, path: str, previous: str | None, manifest: dict[str, Any],
                           keys: list[str]) -> None:
    """Every local parameter's optimizer state, resliced from the shards of whatever layout wrote them."""
    reader = ShardReader(path, manifest, previous)
    common = load_file(os.path.join(path, OPTIMIZER), previous)
    engine.zero.load_param_states(lambda i: reader.read(keys[i], engine.params[i].numel()),
                                  common["hyperparameters"])
    _load_schedule_state(engine, common)


def _load_schedule_state(engine: Any, state: dict[str, Any]) -> None:
    engine.scaler.load_state_dict(state["scaler"])
    if engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _load_format_1(engine: Any, path: str, previous: str | None, manifest: dict[str, Any],
                   same_layout: bool) -> None:
    """A checkpoint written before optimizer state was keyed by parameter: one file per rank."""
    if not same_layout:
        raise CheckpointError(
            f"checkpoint {path} keeps its optimizer state per rank (format 1, written before pipegrid keyed it "
            f"by parameter), which loads only at the layout that wrote it: {manifest['topology']} with "
            f"zero.stage={manifest['zero_stage']}; resume there and save once (the new checkpoint loads at any "
            "layout), or pass load_optimizer_states=False to load the model weights alone")
    coord = engine.groups.coord
    name = legacy_optim_file(coord.pipe, coord.data if engine.zero.sharded else 0, coord.tensor)
    state = load_file(os.path.join(path, name), previous)
    engine.zero.load_state_dict(state["zero"])
    _load_schedule_state(engine, state)
