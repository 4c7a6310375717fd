"""DeepSpeed's pipeline API over pipegrid: change ``import deepspeed`` to
``from pipegrid.compat import deepspeed`` (and ``from deepspeed.pipe import ...`` to
``from pipegrid.compat.deepspeed.pipe import ...``) and the script trains on pipegrid.

``deepspeed.initialize(model=PipelineModule(...), config=ds_config)`` returns an engine whose
``train_batch`` / ``eval_batch`` / ``save_checkpoint`` / ``load_checkpoint`` delegate to
pipegrid's PipelineEngine; the ds_config is translated key by key with DeepSpeed 0.19's
semantics by :mod:`pipegrid.compat.deepspeed.from_config` (what cannot be honoured is one
error; ``config_keys`` reads each section). DeepSpeed itself is never imported.

Names load lazily (as pipegrid's own), so the config translator and its command line
(``python -m pipegrid.compat.deepspeed.from_config``) do not import the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "DeepSpeedConfigError": "pipegrid.compat.deepspeed.from_config",
    "PipelineEngine": "pipegrid.compat.deepspeed.engine",
    "PipelineModule": "pipegrid.compat.deepspeed.pipe",
    "add_config_arguments": "pipegrid.compat.deepspeed.entry",
    "init_distributed": "pipegrid.compat.deepspeed.entry",
    "initialize": "pipegrid.compat.deepspeed.entry",
}
_SUBMODULES = ("pipe", "runtime", "utils")  # deepspeed.pipe, deepspeed.runtime.utils... as attributes

__all__ = ["DeepSpeedConfigError", "PipelineEngine", "PipelineModule", "add_config_arguments", "init_distributed",
           "initialize", "pipe", "runtime", "utils"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pipegrid.compat.deepspeed import pipe, runtime, utils
    from pipegrid.compat.deepspeed.engine import PipelineEngine
    from pipegrid.compat.deepspeed.entry import add_config_arguments, init_distributed, initialize
    from pipegrid.compat.deepspeed.from_config import DeepSpeedConfigError
    from pipegrid.compat.deepspeed.pipe import PipelineModule
