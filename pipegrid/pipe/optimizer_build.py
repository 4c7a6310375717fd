"""Objects from config: a dotted ``_target_`` located and called (Hydra's convention, without
Hydra: library code never composes), and the optimizer with torch's fused kernel by default."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

__all__ = ["build_optimizer", "instantiate", "locate"]


def locate(path: str) -> Any:
    """The object at a dotted path, e.g. ``torch.optim.AdamW`` (Hydra's ``_target_``)."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import _target_ {path!r} ({error}); give a dotted path such as "
                         "torch.optim.AdamW") from None


def instantiate(spec: dict[str, Any], *args: Any) -> Any:
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    return locate(spec["_target_"])(*args, **kwargs)


def build_optimizer(spec: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``spec``'s optimizer, with torch's fused kernel when the config leaves the choice open.

    A fused Adam step is one kernel per parameter instead of ~10 (on CPU 0.2 vs 0.55 ms
    for 4 MLP blocks of width 64, 9 vs 44 ms at width 512); DeepSpeed users get a fused
    Adam by default too. ``optimizer.fused=false`` (or any ``foreach``) keeps torch's own
    choice; an optimizer, device or dtype without a fused kernel falls back to it.
    """
    cls = locate(spec["_target_"])
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    if "fused" in kwargs or "foreach" in kwargs or "fused" not in inspect.signature(cls).parameters:
        return cls(params, **kwargs)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
        return cls(params, **kwargs)
