"""Checkpoint files: their names, atomic writes and safe loads, the ``latest`` pointer, the
collective publish of a step directory, the manifest, and the random state per rank."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.tensor.random import rng_trackers

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


def rng_state(module: nn.Module | None = None) -> dict[str, Any]:
    """This rank's generators: the default ones and ``module``'s tensor-parallel dropout streams."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    trackers = rng_trackers(module) if module is not None else []
    if trackers:
        state["tensor_parallel"] = [tracker.state_dict() for tracker in trackers]
    return state


def set_rng_state(state: dict[str, Any], module: nn.Module | None = None) -> None:
    """Continue from :func:`rng_state`; a checkpoint from before the tensor-parallel streams were
    saved leaves them where the model's seed put them."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("tensor_parallel", [])
    trackers = rng_trackers(module) if module is not None else []
    if saved and len(saved) != len(trackers):
        raise CheckpointError(f"this rank's checkpoint holds {len(saved)} tensor-parallel RNG stream(s), the model "
                              f"has {len(trackers)}; resume with the model (and topology.tensor) that wrote it")
    for tracker, tracker_state in zip(trackers, saved):
        tracker.load_state_dict(tracker_state)


def owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor that is a view of a larger buffer (a ZeRO-1 flat buffer) copied out."""
    return {k: v.detach().clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in state.items()}


def barrier_fn() -> Callable[[], None]:
    return dist.barrier if dist.is_initialized() and dist.get_world_size() > 1 else (lambda: None)
