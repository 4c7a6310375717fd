"""Checkpoints: per layer (by global index) its weights and its optimizer state, a manifest.

Weights and optimizer state are both keyed by layer, whatever stage or ZeRO-1 shard
held them, so a checkpoint written at one pipe x data degree, ZeRO on or off, resumes
at any other (same tensor degree). Every save goes to a temporary directory that is
renamed into place once all ranks have written, and ``latest`` is replaced
atomically, so an interrupted save leaves the previous checkpoint whole. Files load
with ``weights_only=True``: a checkpoint carrying pickled objects is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

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


def optim_state_file(weights_file: str) -> str:
    """The optimizer state of the parameters in ``weights_file`` (a layer or tied file)."""
    return f"optim_{weights_file}"


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
            if not isinstance(spec, TiedLayerSpec) and isinstance(layer, torch.nn.Module) and layer.state_dict():
                files.append((layer_file(index, tensor_rank), layer))
    owners = module.tied_pipe_ranks()
    for key, tied in module.tied_modules.items():
        if tied_on_every_owner or owners[key][0] == engine.pipe_rank:
            files.append((tied_file(key, tensor_rank), tied))
    return files


def _trained_parameters(engine: Any, files: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Per weights file: (optimizer state file, [(parameter name, index in engine.params)])."""
    index = {id(p): i for i, p in enumerate(engine.params)}
    listed = [(optim_state_file(name), [(n, index[id(p)]) for n, p in layer.named_parameters() if id(p) in index])
              for name, layer in files]
    return [(name, params) for name, params in listed if params]


def _save_optimizer_states(engine: Any, tmp: str, files: list[tuple[str, torch.nn.Module]]) -> None:
    """Collective over the data group under ZeRO-1: each layer's optimizer state, whole.

    Data rank ``k % data`` writes the k-th file, so the writing (and, with ZeRO-1, the
    gathering of one layer's shards at a time) is spread over the data ranks.
    """
    data_rank, data = engine.groups.coord.data, engine.topology.data
    for k, (name, params) in enumerate(_trained_parameters(engine, files)):
        writer = k % data
        if not engine.zero.sharded and data_rank != writer:
            continue  # every data rank holds the same state: only the writer reads it
        states = engine.zero.gather_param_states([i for _, i in params], writer)
        if data_rank == writer:
            entries = {n: {"elementwise": s.elementwise, "scalars": s.scalars} for (n, _), s in zip(params, states)}
            save_file({"params": entries}, os.path.join(tmp, name))


def save_engine(engine: Any, directory: str) -> str:
    """Collective: write the engine's whole state as checkpoint ``step_<global_steps>``."""
    coord, rank = engine.groups.coord, engine.groups.rank
    check_writable(directory)

    def write_shards(tmp: str) -> None:
        files = _stage_files(engine, tied_on_every_owner=False)
        if coord.data == 0:
            for name, layer in files:
                save_file(owned(layer.state_dict()), os.path.join(tmp, name))
        _save_optimizer_states(engine, tmp, files)
        if rank == 0:
            group = {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"}
            save_file({"hyperparameters": group, "scaler": engine.scaler.state_dict(),
                       "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
                      os.path.join(tmp, OPTIMIZER))
        save_file({"rng": rng_state()}, os.path.join(tmp, rank_file(rank)))

    topo = engine.topology
    manifest = {"format": FORMAT, "step": engine.global_steps, "global_steps": engine.global_steps,
                "skipped_steps": engine.skipped_steps, "consumed_micro_batches": engine.consumed_micro_batches,
                "topology": {"pipe": topo.pipe, "data": topo.data, "tensor": topo.tensor},
                "zero_stage": engine.config.zero.stage, "loss_scale": engine.scaler.scale,
                "layers": _layer_names(engine.module), "client_state": engine.client_state,
                "schedule": engine.config.schedule.name, "world_size": topo.world_size}
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
        _load_optimizer_states(engine, path, previous, files)
    rank_path = os.path.join(path, rank_file(engine.groups.rank))
    if same_layout and os.path.exists(rank_path):
        set_rng_state(load_file(rank_path, previous)["rng"])
    engine.global_steps = manifest["global_steps"]
    engine.skipped_steps = manifest["skipped_steps"]
    engine.consumed_micro_batches = manifest["consumed_micro_batches"]
    engine.client_state = dict(manifest.get("client_state") or {})
    return manifest["step"]


def _load_optimizer_states(engine: Any, path: str, previous: str | None,
                           files: list[tuple[str, torch.nn.Module]]) -> None:
    """Every local parameter's optimizer state from its layer's file, whatever layout wrote it."""
    from pipegrid.pipe.zero import ParamState

    source = {i: (name, n) for name, params in _trained_parameters(engine, files) for n, i in params}
    opened: dict[str, dict[str, Any]] = {}

    def read(index: int) -> ParamState:
        name, param = source[index]
        if name not in opened:  # memory-mapped: a ZeRO-1 shard reads only its slice
            opened[name] = load_file(os.path.join(path, name), previous, mmap=True)["params"]
        if param not in opened[name]:
            raise CheckpointError(f"checkpoint file {os.path.join(path, name)} has no optimizer state for "
                                  f"parameter {param!r} (it has {sorted(opened[name])}); was it frozen when saved? "
                                  "pass load_optimizer_states=False to load the weights alone")
        entry = opened[name][param]
        return ParamState(entry["elementwise"], entry["scalars"])

    common = load_file(os.path.join(path, OPTIMIZER), previous)
    engine.zero.load_param_states(read, common["hyperparameters"])
    _load_schedule_state(engine, common)


def _load_schedule_state(engine: Any, state: dict[str, Any]) -> None:
    engine.scaler.load_state_dict(state["scaler"])
    if engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _load_format_1(engine: Any, path: str, previous: str | None, manifest: dict[str, Any],
                   same_layout: bool) -> None:
    """A checkpoint written before optimizer state was keyed by layer: one file per rank."""
    if not same_layout:
        raise CheckpointError(
            f"checkpoint {path} keeps its optimizer state per rank (format 1, written before pipegrid keyed it "
            f"by layer), which loads only at the layout that wrote it: {manifest['topology']} with zero.stage="
            f"{manifest['zero_stage']}; resume there and save once (the new checkpoint loads at any layout), "
            "or pass load_optimizer_states=False to load the model weights alone")
    coord = engine.groups.coord
    name = legacy_optim_file(coord.pipe, coord.data if engine.zero.sharded else 0, coord.tensor)
    state = load_file(os.path.join(path, name), previous)
    engine.zero.load_state_dict(state["zero"])
    _load_schedule_state(engine, state)
