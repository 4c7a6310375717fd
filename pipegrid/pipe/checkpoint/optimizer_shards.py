"""Optimizer state in a checkpoint, keyed by parameter (``<layer file stem>/<name>``) and
element range, whatever stage or ZeRO shard held it: what a rank writes, and a reader that
reslices it for any other layout."""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.pipe.checkpoint.files import (
    CheckpointError,
    load_file,
    optim_shard_file,
    save_file,
)
from pipegrid.pipe.zero import OptimizerState, ParamState
from pipegrid.topology.grid import Coord

__all__ = ["ShardReader", "write_optimizer_shard"]


def _local_pieces(state: OptimizerState, params: list[torch.nn.Parameter], keys: list[str | None],
                  coord: Coord, data: int) -> dict[str, dict[str, Any]]:
    """What this rank writes: ``key -> {"range", "elementwise", "scalars"}``. A ZeRO-1 rank
    writes its shard; without ZeRO the data ranks split the (identical) parameters into
    contiguous runs of about equal size, so every rank writes a share."""
    pieces = [piece for piece in state.local_param_states() if keys[piece[0]] is not None]
    if not state.sharded:
        sizes = [p.numel() for p in params]
        starts, total = [0, *itertools.accumulate(sizes)], max(sum(sizes), 1)
        pieces = [piece for piece in pieces if starts[piece[0]] * data // total == coord.data]
    return {keys[i]: {"range": [start, end], "elementwise": held.elementwise, "scalars": held.scalars}
            for i, start, end, held in pieces}


def write_optimizer_shard(state: OptimizerState, params: list[torch.nn.Parameter], keys: list[str | None],
                          coord: Coord, data: int, tmp: str) -> dict[str, dict[str, list[int]]]:
    """Collective: write this rank's pieces; return every rank's ``{file: {key: [start, end]}}``."""
    name = optim_shard_file(coord.pipe, coord.data, coord.tensor)
    pieces = _local_pieces(state, params, keys, coord, data)
    if pieces:
        save_file({"params": pieces}, os.path.join(tmp, name))
    mine = {name: {key: piece["range"] for key, piece in pieces.items()}} if pieces else {}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {file: ranges for shards in everyone for file, ranges in shards.items()}


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
        for start, end, _file in pieces:
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
