"""The module's grid: ``initialize`` takes the grid (``topology``) and
``schedule.virtual_stages`` from the PipelineModule, and from the process groups when it
is given them, wherever the config leaves them unset; the grid is said once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipegrid.conf.schema import TopologyConfig, TrainConfig
from pipegrid.schedules import registry
from pipegrid.topology.groups import ProcessGroups

__all__ = ["check_schedule_runs_module", "config_with_module_grid"]

_AXES = ("pipe", "data", "tensor")


def _module_grid(module: Any, groups: ProcessGroups | None) -> dict[str, tuple[int, str]]:
    """axis -> (size, what says so): the module's cut, its topology, and the groups."""
    grid = {"pipe": (module.pipe, f"the module (cut into pipe={module.pipe})")}
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


def config_with_module_grid(cfg: TrainConfig, module: Any, groups: ProcessGroups | None = None) -> TrainConfig:
    """``cfg`` with ``topology`` and ``schedule.virtual_stages`` taken from the module (and
    ``groups``) wherever the config leaves them unset, so the grid is said once.

    A value the config does set must equal the module's: a mismatch names both.
    """
    if getattr(module, "num_model_stages", None) is None:
        raise TypeError(f"initialize() needs a pipegrid.PipelineModule, got {type(module).__name__}")
    grid = _module_grid(module, groups)
    sizes = {}
    for axis in _AXES:
        given = getattr(cfg.topology, axis)
        if axis not in grid:  # a module cut by pipe= alone says nothing of data or tensor
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
    check_schedule_runs_module(sched.name, module)
    return dataclasses.replace(cfg, topology=TopologyConfig(**sizes),
                               schedule=dataclasses.replace(sched, virtual_stages=chunks))


def check_schedule_runs_module(schedule: str, module: Any) -> None:
    """Refuse a module whose chunk count or stage placement the schedule does not run, naming the fix."""
    spec, chunks, placed = registry.get(schedule), module.virtual_stages, module.placement.kind
    if not spec.accepts_chunks(chunks):
        runs = [s.name for s in registry.SCHEDULES.values()
                if s.training and s.accepts_chunks(chunks) and s.placement in (None, placed)]
        who = f"only schedule.name={runs[0]}" if len(runs) == 1 else f"schedule.name={' or '.join(runs) or 'none'}"
        wanted = (spec.chunks or (1,))[0]
        fix = f"virtual_stages={wanted}" + (f", stage_placement={spec.placement!r}" if wanted > 1 else "")
        raise ValueError(f"the module was cut into virtual_stages={chunks} chunks per pipe rank, which {who} runs, "
                         f"got {schedule!r}; set schedule.name={' or '.join(runs) or '...'} or build the module with "
                         f"{fix}")
    wanted_placement = spec.placement or placed
    if chunks > 1 and placed != wanted_placement:
        raise ValueError(f"schedule.name={schedule!r} runs model stages placed {wanted_placement!r} ({spec.summary}) "
                         f"but the module was built with stage_placement={placed!r}; build it with "
                         f"PipelineModule(..., virtual_stages={chunks}, stage_placement={wanted_placement!r})")
