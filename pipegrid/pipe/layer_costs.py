"""Measured layer costs for ``partition_method="profile"``: each layer's forward and backward
time on an example micro-batch, measured once on rank 0 and agreed on by every rank."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["agreed", "detached_input", "profile_layer_costs"]


def detached_input(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(detached_input(t) for t in x)
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.is_floating_point())
    return x


def profile_layer_costs(layers: Sequence[Any], example_input: Any, *, seed: int = 1234,
                        repeats: int = 3) -> list[float]:
    """Seconds each layer takes for a forward and backward of ``example_input`` (the
    fastest of ``repeats``). Builds every layer in this process, once."""
    from pipegrid.pipe.module import (
        build_reference,  # (module builds its partition from these costs)
    )

    model = build_reference(layers, seed=seed)
    costs, x = [], example_input
    for entry in model.stage_module()._entries:
        best = float("inf")
        for _ in range(repeats):
            inp = detached_input(x)
            start = time.perf_counter()
            out = entry.call(inp)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            grads = [t.sum() for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
            if grads:
                sum(grads).backward()
            best = min(best, time.perf_counter() - start)
        x = detached_input(out)
        costs.append(max(best, 1e-9))  # costs must be positive
    return costs


def agreed(costs: list[float]) -> list[float]:
    """Rank 0's measurement on every rank: timings differ per process, partitions must not."""
    if dist.is_available() and dist.is_initialized():
        box = [costs]
        dist.broadcast_object_list(box, src=0)
        costs = box[0]
    return costs
