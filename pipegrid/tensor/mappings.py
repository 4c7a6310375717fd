"""The tensor-parallel group and the four conjugate mappings between replicated and
split activations (Megatron-LM's copy / reduce / gather / split "regions").

``group`` is a torch.distributed process group: pass ``groups.tensor_parallel_group``
(or ``dist.group.WORLD`` to split over every process). ``None`` means no tensor
parallelism, as :class:`~pipegrid.ProcessGroups` reports a one-rank group; unlike
torch's collectives, it never means the world (at pipe=2, tensor=1 that would shard
a layer over the pipe ranks). With ``None``, a one-rank group or torch.distributed
not initialised, every mapping is an identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "copy_to_region",
    "gather_from_region",
    "reduce_from_region",
    "split_to_region",
    "tensor_parallel_rank",
    "tensor_parallel_size",
]

Group = Any  # a torch.distributed ProcessGroup, or None for none (dense)


# ---- the group --------------------------------------------------------------------

def _active(group: Group) -> Group:
    """The group collectives run on, or None when there is nothing to run (dense)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return group if dist.get_world_size(group) > 1 else None


def tensor_parallel_size(group: Group = None) -> int:
    """Ranks in ``group``; 1 for None or when torch.distributed is not initialised."""
    active = _active(group)
    return 1 if active is None else dist.get_world_size(active)


def tensor_parallel_rank(group: Group = None) -> int:
    """This process's rank within ``group``; 0 when dense."""
    active = _active(group)
    return 0 if active is None else dist.get_rank(active)


def _shard_size(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(
            f"{what}={total} must be divisible by the tensor-parallel group size {parts}; "
            f"choose {what} a multiple of {parts} or a smaller tensor degree")
    return total // parts


# ---- conjugate autograd functions ---------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _all_gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    width = _shard_size(x.shape[-1], dist.get_world_size(group), "last dimension")
    start = dist.get_rank(group) * width
    return x[..., start:start + width].contiguous()


def conjugate(name: str, doc: str, forward: Callable[[torch.Tensor, Group], torch.Tensor],
              backward: Callable[[torch.Tensor, Group], torch.Tensor]) -> type[torch.autograd.Function]:
    """An autograd function that runs ``forward(x, group)`` forward and ``backward(grad, group)``
    backward: Megatron's mappings are such pairs (gather/slice, split/gather, reduce-scatter/gather),
    each written once here instead of as a class apiece."""

    def run_forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return forward(x, group)

    def run_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return backward(grad, ctx.group), None

    # built with its name, so autograd's node reads "<name>Backward" in graphs, profiles and errors
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward), "__doc__": doc,
                                                   "backward": staticmethod(run_backward), "__module__": __name__})


_GatherFromRegion = conjugate("_GatherFromRegion", "All-gather along the last dim forward; keep this rank's slice "
                              "backward.", _all_gather_last, _own_slice_last)
_SplitToRegion = conjugate("_SplitToRegion", "Keep this rank's slice of the last dim forward; all-gather backward.",
                           _own_slice_last, _all_gather_last)


def _apply_in(fn: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
    """``fn.apply(x, group)`` over the active tensor group; ``x`` itself without one (tensor 1)."""
    active = _active(group)
    return x if active is None else fn.apply(x, active)


def copy_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced backward."""
    return _apply_in(_CopyToRegion, x, group)


def reduce_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Leave a region by summing partial results: all-reduce forward, identity backward."""
    return _apply_in(_ReduceFromRegion, x, group)


def gather_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Leave a region by concatenating shards along the last dim (backward keeps the slice)."""
    return _apply_in(_GatherFromRegion, x, group)


def split_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Enter a region by keeping this rank's slice of the last dim (backward gathers)."""
    return _apply_in(_SplitToRegion, x, group)
