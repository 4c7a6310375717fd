"""An engine's whole state in a checkpoint: one weights file per layer, optimizer shards keyed
by parameter, the loss scale and LR schedule, and the training progress in the manifest.

Functions here take a ``Checkpointable`` (what they read of an engine) and never write into
it: loading returns the ``TrainingProgress`` it found, and the engine restores its own.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipegrid.conf.schema import TrainConfig
from pipegrid.pipe.checkpoint.files import (
    FORMAT,
    OPTIMIZER,
    CheckpointError,
    barrier_fn,
    check_same_model,
    check_writable,
    latest_step_dir,
    layer_file,
    load_file,
    owned,
    previous_whole,
    rank_file,
    read_manifest,
    rng_state,
    save,
    save_file,
    set_rng_state,
    tied_file,
)
from pipegrid.pipe.checkpoint.legacy import load_format_1
from pipegrid.pipe.checkpoint.optimizer_shards import ShardReader, write_optimizer_shard
from pipegrid.pipe.precision import LossScaler
from pipegrid.pipe.zero import OptimizerState
from pipegrid.topology.groups import ProcessGroups

__all__ = ["Checkpointable", "TrainingProgress", "load_engine", "parameter_keys", "save_engine"]


@dataclass
class TrainingProgress:
    """Where training is, as a checkpoint records it beside the weights and optimizer state."""

    global_steps: int = 0
    skipped_steps: int = 0
    consumed_micro_batches: int = 0
    client_state: dict[str, Any] = field(default_factory=dict)
    """JSON-able user state saved with checkpoints."""


class Checkpointable(Protocol):
    """What a checkpoint reads of an engine (``PipelineEngine`` is one)."""

    module: Any  # a PipelineModule: layer_specs, stage_ids, local_layers, tied_modules, tied_pipe_ranks
    groups: ProcessGroups
    config: TrainConfig
    params: list[torch.nn.Parameter]
    pipe_rank: int

    @property
    def zero(self) -> OptimizerState: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def scaler(self) -> LossScaler: ...

    @property
    def lr_scheduler(self) -> Any: ...

    def progress(self) -> TrainingProgress: ...


def _layer_names(module: Any) -> list[str]:
    from pipegrid.pipe.module import _class_name

    return [_class_name(layer) for layer in module.layer_specs]


def _stage_files(engine: Checkpointable, tied_on_every_owner: bool) -> list[tuple[str, torch.nn.Module]]:
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


def parameter_keys(engine: Checkpointable, tied_on_every_owner: bool = True) -> list[str | None]:
    """Per entry of ``engine.params``, what keys its optimizer state in any layout:
    ``<layer file stem>/<name in the layer>`` (None: a tied copy another rank saves)."""
    keys = {id(p): f"{name[:-len('.pt')]}/{n}" for name, layer in _stage_files(engine, tied_on_every_owner)
            for n, p in layer.named_parameters()}
    return [keys.get(id(p)) for p in engine.params]


def save_engine(engine: Checkpointable, directory: str) -> str:
    """Collective: write the engine's whole state as checkpoint ``step_<global_steps>``."""
    coord, rank, topo = engine.groups.coord, engine.groups.rank, engine.groups.topology
    check_writable(directory)
    progress = engine.progress()
    manifest = {"format": FORMAT, "step": progress.global_steps, "global_steps": progress.global_steps,
                "skipped_steps": progress.skipped_steps, "consumed_micro_batches": progress.consumed_micro_batches,
                "topology": {"pipe": topo.pipe, "data": topo.data, "tensor": topo.tensor},
                "zero_stage": engine.config.zero.stage, "loss_scale": engine.scaler.scale,
                "layers": _layer_names(engine.module), "client_state": progress.client_state,
                "schedule": engine.config.schedule.name, "world_size": topo.world_size}

    def write_shards(tmp: str) -> None:
        files = _stage_files(engine, tied_on_every_owner=False)
        if coord.data == 0:
            for name, layer in files:
                save_file(owned(layer.state_dict()), os.path.join(tmp, name))
        keys = parameter_keys(engine, tied_on_every_owner=False)
        # rank 0 writes the manifest after every shard: it lists where each parameter's state is
        manifest["optimizer_shards"] = write_optimizer_shard(engine.zero, engine.params, keys, coord, topo.data, tmp)
        if rank == 0:
            group = {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"}
            save_file({"hyperparameters": group, "scaler": engine.scaler.state_dict(),
                       "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
                      os.path.join(tmp, OPTIMIZER))
        save_file({"rng": rng_state(engine.module)}, os.path.join(tmp, rank_file(rank)))

    return save(directory, progress.global_steps, rank, write_shards, manifest, barrier_fn())


def load_engine(engine: Checkpointable, directory: str,
                load_optimizer_states: bool = True) -> tuple[int, TrainingProgress] | None:
    """Load the newest whole checkpoint under ``directory`` into the engine's model and optimizer
    state; (its step, the progress it recorded), or None when there is none."""
    path = latest_step_dir(directory)
    if path is None:
        return None
    manifest = read_manifest(path)
    check_same_model(manifest, _layer_names(engine.module), path)
    previous = previous_whole(directory, path)
    topo = engine.groups.topology
    saved_tensor = manifest["topology"]["tensor"]
    if saved_tensor != topo.tensor:
        raise CheckpointError(f"checkpoint {path} has tensor={saved_tensor} shards per layer, this run has "
                              f"tensor={topo.tensor}; resume with topology.tensor={saved_tensor}")
    with torch.no_grad():
        for name, layer in _stage_files(engine, tied_on_every_owner=True):
            layer.load_state_dict(load_file(os.path.join(path, name), previous))
    same_layout = (manifest["topology"] == {"pipe": topo.pipe, "data": topo.data, "tensor": topo.tensor}
                   and manifest["zero_stage"] == engine.config.zero.stage)
    if not load_optimizer_states:
        engine.zero.sync_master_from_params()
    elif manifest.get("format", 1) == 1:
        load_schedule_state(engine, load_format_1(engine.zero, engine.groups.coord, path, previous, manifest,
                                                  same_layout))
    else:
        _load_optimizer_states(engine, path, previous, manifest, parameter_keys(engine))
    rank_path = os.path.join(path, rank_file(engine.groups.rank))
    if same_layout and os.path.exists(rank_path):
        set_rng_state(load_file(rank_path, previous)["rng"], engine.module)
    progress = TrainingProgress(manifest["global_steps"], manifest["skipped_steps"],
                                manifest["consumed_micro_batches"], dict(manifest.get("client_state") or {}))
    return manifest["step"], progress


def _load_optimizer_states(engine: Checkpointable, path: str, previous: str | None, manifest: dict[str, Any],
                           keys: list[str]) -> None:
    """Every local parameter's optimizer state, resliced from the shards of whatever layout wrote them."""
    reader = ShardReader(path, manifest, previous)
    common = load_file(os.path.join(path, OPTIMIZER), previous)
    engine.zero.load_param_states(lambda i: reader.read(keys[i], engine.params[i].numel()),
                                  common["hyperparameters"])
    load_schedule_state(engine, common)


def load_schedule_state(engine: Checkpointable, state: dict[str, Any]) -> None:
    """The loss scale and the LR schedule, shared by every rank."""
    engine.scaler.load_state_dict(state["scaler"])
    if engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
