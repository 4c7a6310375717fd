"""pipegrid: pipeline-parallel training for PyTorch on a data x pipe x tensor grid.

The public API is re-exported here and loaded lazily, so that importing a pure
part (``pipegrid.schedules``, ``pipegrid.topology.grid``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ProcessTopology": "pipegrid.topology.grid",
    "Topology": "pipegrid.topology.grid",
    "Coord": "pipegrid.topology.grid",
    "ProcessGroups": "pipegrid.topology.groups",
    "ScheduleError": "pipegrid.schedules.errors",
    "stage_placement": "pipegrid.schedules.registry",
    "LayerSpec": "pipegrid.pipe.spec",
    "TiedLayerSpec": "pipegrid.pipe.spec",
    "PipelineModule": "pipegrid.pipe.module",
    "build_reference": "pipegrid.pipe.module",
    "PipelineEngine": "pipegrid.pipe.engine",
    "initialize": "pipegrid.pipe.engine",
    "init_distributed": "pipegrid.topology.join",
    "TrainConfig": "pipegrid.conf.schema",
    "Preempted": "pipegrid.pipe.preemption",
    "CachedLayer": "pipegrid.pipe.kv_cache",
    "DecodeStep": "pipegrid.pipe.kv_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pipegrid' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pipegrid.conf.schema import TrainConfig
    from pipegrid.pipe.engine import PipelineEngine, initialize
    from pipegrid.pipe.kv_cache import CachedLayer, DecodeStep
    from pipegrid.topology.join import init_distributed
    from pipegrid.pipe.module import PipelineModule, build_reference
    from pipegrid.pipe.preemption import Preempted
    from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec
    from pipegrid.schedules.errors import ScheduleError
    from pipegrid.schedules.registry import stage_placement
    from pipegrid.topology.grid import Coord, ProcessTopology, Topology
    from pipegrid.topology.groups import ProcessGroups
