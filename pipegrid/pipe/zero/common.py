"""What both optimizer-state layouts share: per-parameter state for checkpoints
(``ParamState``), flat bucketed all-reduce, storage accounting, fp32 gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pipegrid import kernels


_BUCKET_ELEMENTS = 1 << 24  # all-reduce in flat buckets of at most this many elements
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
MASTER = "fp32_master"  # the fp32 master weight, kept beside the optimizer state in 16-bit training
# param-group entries that say how this run's optimizer is built, not where training is
_BUILD_KEYS = ("params", "param_names", "fused", "foreach", "capturable", "differentiable")



class ParamState(NamedTuple):
    """One parameter's optimizer state, independent of how the data axis shards it."""

    elementwise: dict[str, torch.Tensor]
    """One value per parameter element (Adam's moments, ``MASTER``), flattened or shaped like it."""
    scalars: dict[str, torch.Tensor]
    """One value per parameter (Adam's ``step``)."""


def buckets(tensors: list[torch.Tensor], max_elements: int = _BUCKET_ELEMENTS) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > max_elements:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def all_reduce_flat(tensors: list[torch.Tensor], group: Any, *, scale: float | None = None,
                    out: list[torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                    backend: str = "auto") -> None:
    """Sum ``tensors`` over ``group`` one flat bucket at a time, into ``out`` (default: in place)."""
    out = tensors if out is None else out
    start = 0
    for bucket in buckets(tensors):
        targets = out[start:start + len(bucket)]
        start += len(bucket)
        layout = kernels.FlatLayout.from_tensors(bucket, dtype=dtype)  # once: the sum goes back where it came from
        flat = kernels.pack(bucket, scale=scale, layout=layout, backend=backend)
        if group is not None:  # None: a one-rank group, nothing to sum
            dist.all_reduce(flat, group=group)
        if any(t.dtype != b.dtype for t, b in zip(targets, bucket)):
            layout = kernels.FlatLayout.from_tensors(targets, dtype=flat.dtype)
        kernels.unpack(flat, layout, out=targets, backend=backend)


def storage_bytes(kinds: dict[str, Iterable[torch.Tensor | None]]) -> dict[str, int]:
    """Bytes of the storages behind each kind's tensors, each storage counted once, under
    the first kind that holds it (a flat buffer's views count once, in full)."""
    seen: set[int] = set()
    report = {}
    for kind, tensors in kinds.items():
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        report[kind] = total
    return report


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def accumulate_in_fp32(params: list[torch.nn.Parameter], target: Callable[[int], torch.Tensor | None],
                        start: Callable[[int, torch.Tensor], None]) -> list[Any]:
    """Add each 16-bit gradient autograd accumulates into parameter i's fp32 gradient
    (``target(i)``, or ``start(i, grad)`` makes it) and free the 16-bit one."""
    def hook(i: int) -> Callable[[torch.Tensor], None]:
        def add(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            main = target(i)
            if main is None:
                start(i, grad.float())
            else:
                main.add_(grad)
        return add
    return [p.register_post_accumulate_grad_hook(hook(i)) for i, p in enumerate(params)]


def ensure_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


def load_torch_state(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]],
                      hyperparameters: dict[str, Any]) -> None:
    """Give ``optimizer`` per-parameter ``state`` (by parameter index) and the saved
    hyperparameters (the learning rate a scheduler moved), through torch's own loader,
    which casts each value to its parameter's dtype and device as the optimizer wants."""
    template = optimizer.state_dict()["param_groups"]
    saved = {k: v for k, v in hyperparameters.items() if k not in _BUILD_KEYS}
    optimizer.load_state_dict({"state": state, "param_groups": [{**group, **saved} for group in template]})


def check_scalars(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor], where: str) -> None:
    if first.keys() != other.keys() or any(not torch.equal(first[k], other[k]) for k in first):
        raise ValueError(f"{where}: the per-parameter optimizer values {sorted(first)} differ between parameters "
                         "that ZeRO-1 steps as one shard; resume this checkpoint with zero.stage=0")

