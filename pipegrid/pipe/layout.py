"""The run's layout from the module: ``initialize`` takes the grid (``topology``) and
``schedule.virtual_stages`` from the PipelineModule, and from the process groups when it
is given them, wherever the config leaves them unset; the grid is said once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipegrid.conf.schema import TopologyConfig, TrainConfig
from pipegrid.topology.groups import ProcessGroups

__all__ = ["resolve_layout"]

_AXES = ("pipe", "data", "tensor")


def _module_grid(module: Any, groups: ProcessGroups | None) -> dict[str, tuple[int, str]]:
    """axis -> (size, what says so): the module's cut, its topology, and the groups."""
    grid = {"pipe": (module.num_stages, f"the module (cut into num_stages={module.num_stages})")}
    if module.topology is not None:
        grid.update({axis: (getattr(module.topology, axis), f"the module's {module.topology!r}") for axis in _AXES})
    if groups is not None:
        for axis in _AXES:
            size = getattr(groups.topology, axis)
            if axis in grid and grid[axis][0] != size:
                raise ValueError(f"{grid[axis][1]} has {axis}={grid[axis][0]} but the groups were built for "
                                 f"{groups.topology!r}; build the module and the groups from one topology")
            grid[axis] = (size, f"the groups' {groups.topology!r}")
    return grid


def resolve_layout(cfg: TrainConfig, module: Any, groups: ProcessGroups | None = None) -> TrainConfig:
    """``cfg`` with ``topology`` and ``schedule.virtual_stages`` taken from the module (and
    ``groups``) wherever the config leaves them unset, so the grid is said once.

    A value the config does set must equal the module's: a mismatch names both.
    """
    if getattr(module, "num_stages", None) is None:
        raise TypeError(f"initialize() needs a pipegrid.PipelineModule, got {type(module).__name__}")
    grid = _module_grid(module, groups)
    sizes = {}
    for axis in _AXES:
        given = getattr(cfg.topology, axis)
        if axis not in grid:  # a module cut by num_stages alone says nothing of data or tensor
            sizes[axis] = given  # (1 when unset)
            continue
        sizes[axis], source = grid[axis]
        if cfg.is_set(f"topology.{axis}") and given != sizes[axis]:
            raise ValueError(f"{source} has {axis}={sizes[axis]} but the config sets topology.{axis}={given}; "
                             f"leave topology.{axis} out of the config (the module's grid is used) or build the "
                             f"module with topology.{axis}={given}")
    chunks, sched = module.virtual_stages, cfg.schedule
    if cfg.is_set("schedule.virtual_stages") and sched.virtual_stages != chunks:
        raise ValueError(f"the module was cut into virtual_stages={chunks} chunks per pipe rank but the config "
                         f"sets schedule.virtual_stages={sched.virtual_stages}; leave it out of the config or build "
                         f"the module with virtual_stages={sched.virtual_stages}")
    if chunks > 1 and sched.name != "interleaved_1f1b":
        raise ValueError(f"the module was cut into virtual_stages={chunks} chunks per pipe rank, which only "
                         f"schedule.name=interleaved_1f1b runs, got {sched.name!r}; set schedule.name="
                         "interleaved_1f1b or build the module with virtual_stages=1")
    return dataclasses.replace(cfg, topology=TopologyConfig(**sizes),
                               schedule=dataclasses.replace(sched, virtual_stages=chunks))
