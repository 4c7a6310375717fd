"""Optimizers over the data axis: fp32 master weights, gradient reduction, ZeRO-1.

``ReplicatedOptimizer`` (``zero.stage: 0``) all-reduces gradients and keeps the full
optimizer state on every data rank. ``ZeroOptimizer`` (``zero.stage: 1``) keeps one
flat fp32 master copy split evenly over the data group: gradients are
reduce-scattered into the shards, the wrapped torch optimizer steps on this rank's
shard only, and the updated parameters are all-gathered back. Both keep fp32 master
weights when the model runs in bf16/fp16, and move bytes through pipegrid.kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels

_BUCKET_ELEMENTS = 1 << 24  # all-reduce in flat buckets of at most this many elements
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


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
        flat = kernels.pack(bucket, dtype=dtype, scale=scale, backend=backend)
        if group is not None:  # None: a one-rank group, nothing to sum
            dist.all_reduce(flat, group=group)
        layout = kernels.FlatLayout.from_tensors(targets, dtype=flat.dtype)
        kernels.unpack(flat, layout, out=targets, backend=backend)


def _ensure_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


class ReplicatedOptimizer:
    """Every data rank holds the whole optimizer state (``zero.stage: 0``)."""

    sharded = False

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 backend: str = "auto") -> None:
        self.params, self.group, self.data_size, self.backend = params, data_group, data_size, backend
        low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        self.master = ([torch.nn.Parameter(p.detach().float().clone()) for p in params]
                       if low_precision else params)
        self.optimizer = factory(self.master)

    def reduce_grads(self) -> None:
        """Average model gradients over the data group into the master gradients (fp32)."""
        grads = _ensure_grads(self.params)
        if self.master is self.params and self.data_size == 1:
            return
        scale = 1.0 / self.data_size if self.data_size > 1 else None
        targets = _ensure_grads(self.master)
        all_reduce_flat(grads, self.group, scale=scale, out=targets, dtype=targets[0].dtype if targets else None,
                        backend=self.backend)

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """Master gradients (of the parameters whose ``id`` is in ``counted``, if given)."""
        pairs = zip(self.params, _ensure_grads(self.master))
        return [g for p, g in pairs if counted is None or id(p) in counted]

    def step(self, grad_coef: float = 1.0) -> None:
        if grad_coef != 1.0:
            torch._foreach_mul_(self.grads(), grad_coef)
        self.optimizer.step()
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.master is not self.params:
            for p in self.master:
                p.grad = None

    def sync_master_from_params(self) -> None:
        """After loading model weights alone: the fp32 master copy follows them."""
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.master, self.params)

    def memory(self) -> dict[str, int]:
        master = 0 if self.master is self.params else sum(p.numel() * 4 for p in self.master)
        master_grads = 0 if self.master is self.params else sum(p.numel() * 4 for p in self.master)
        return {"optimizer": _state_bytes(self.optimizer), "master_weights": master, "buffers": master_grads}

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.master is not self.params:
            state["master"] = [p.detach() for p in self.master]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "master" in state and self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.master, state["master"])


_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroOptimizer:
    """ZeRO-1: optimizer state and fp32 master weights sharded evenly over the data group.

    The stage's parameters and gradients become views into two flat buffers (as
    DDP's ``gradient_as_bucket_view``), so reduce-scatter reads the gradients where
    autograd wrote them and all-gather writes the parameters where the model reads
    them. In float32 the master shard *is* this rank's slice of the parameters;
    in bf16/fp16 it is an fp32 copy of that slice alone.
    """

    sharded = True

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto") -> None:
        self.params, self.group, self.backend = params, data_group, backend
        self.data_size, self.data_rank = data_size, data_rank
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params else torch.float32
        if any(p.dtype != dtype for p in params):
            raise TypeError(f"ZeRO-1 needs one parameter dtype per stage, got {sorted({str(p.dtype) for p in params})}")
        self.layout = kernels.FlatLayout.from_tensors(params)
        self.shard_size = -(-self.layout.total // data_size)  # padded: every rank owns an equal shard
        self.param_flat = torch.zeros(self.shard_size * data_size, dtype=dtype, device=device)
        self.grad_flat = torch.zeros_like(self.param_flat)
        with torch.no_grad():
            for p, view, grad in zip(params, kernels.views(self.param_flat, self.layout),
                                     kernels.views(self.grad_flat, self.layout)):
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
                p.grad = grad
        lo = data_rank * self.shard_size
        self._range = (lo, lo + self.shard_size)
        own = self.param_flat[lo:lo + self.shard_size]
        self.low_precision = dtype != torch.float32 and dtype != torch.float64
        self.shard = torch.nn.Parameter(own.detach().float().clone() if self.low_precision else own)
        # in float32 the shard's gradient is this rank's slice of the flat gradient itself
        self.shard.grad = (torch.zeros_like(self.shard) if self.low_precision
                           else self.grad_flat[lo:lo + self.shard_size])
        self.optimizer = factory([self.shard])

    def reduce_grads(self) -> None:
        """Reduce-scatter the gradients: this rank receives the mean of its shard."""
        lo, hi = self._range
        if self.data_size > 1:
            # a separate output: the collective must not write into the buffer it reads
            out = torch.empty(self.shard_size, dtype=self.grad_flat.dtype, device=self.grad_flat.device)
            _reduce_scatter(out, self.grad_flat, group=self.group)
            self.shard.grad.copy_(out).mul_(1.0 / self.data_size)
        elif self.low_precision:
            self.shard.grad.copy_(self.grad_flat[lo:hi])

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """This rank's slices of the gradient (only the parameters in ``counted``, if given)."""
        if counted is None:
            return [self.shard.grad]
        lo, hi = self._range
        slices = []
        for p, offset, numel in zip(self.params, self.layout.offsets, self.layout.numels):
            start, end = max(offset, lo), min(offset + numel, hi)
            if id(p) in counted and start < end:
                slices.append(self.shard.grad[start - lo:end - lo])
        return slices

    def step(self, grad_coef: float = 1.0) -> None:
        if grad_coef != 1.0:
            self.shard.grad.mul_(grad_coef)
        self.optimizer.step()
        lo, hi = self._range
        own = self.shard.detach().to(self.param_flat.dtype)  # a copy: all-gather must not alias its output
        if self.data_size > 1:
            _all_gather(self.param_flat, own, group=self.group)
        elif self.low_precision:
            self.param_flat[lo:hi].copy_(own)

    def sync_master_from_params(self) -> None:
        """After loading model weights alone: the fp32 master shard follows them."""
        if self.low_precision:
            lo, hi = self._range
            with torch.no_grad():
                self.shard.copy_(self.param_flat[lo:hi])

    def zero_grad(self) -> None:
        self.grad_flat.zero_()  # the parameters' .grad are views of it and stay in place
        self.shard.grad.zero_()

    def memory(self) -> dict[str, int]:
        shard_bytes = self.shard.numel() * 4
        transient = self.shard.numel() * self.param_flat.element_size()  # reduce-scatter out / all-gather in
        return {"optimizer": _state_bytes(self.optimizer),
                "master_weights": shard_bytes if self.low_precision else 0,
                # + the fp32 shard gradient (in float32 it is a view of the flat gradient)
                "buffers": transient + (shard_bytes if self.low_precision else 0)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "shard": self.shard.detach().clone(),
                "data_rank": self.data_rank, "data_size": self.data_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("data_size") != self.data_size:
            raise ValueError(f"the ZeRO-1 optimizer state was saved with data={state.get('data_size')} shards, "
                             f"this run has data={self.data_size}; resume with the same topology.data or "
                             "load model weights only (load_optimizer_states=False)")
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.shard.copy_(state["shard"])
