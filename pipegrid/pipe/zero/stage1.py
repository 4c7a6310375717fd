"""``zero.stage: 1``: optimizer state and fp32 master weights sharded evenly over the data
group; gradients reduce-scattered into the shards, parameters all-gathered back; with
``offload`` the shard's master, gradient and optimizer state in host memory. ZeRO-2 and
ZeRO-3 (stage2.py, stage3.py) build on this class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels
from pipegrid.pipe.zero.common import (
    MASTER,
    Factory,
    ParamState,
    accumulate_in_fp32,
    check_scalars,
    load_torch_state,
    state_tensors,
    storage_bytes,
)
from pipegrid.pipe.zero.offload import HostTransfers


def _views_at(flat: torch.Tensor, layout: kernels.FlatLayout) -> list[torch.Tensor]:
    """Views of ``flat`` at ``layout``'s element offsets, whatever ``flat``'s dtype: the fp32
    gradient buffer lines up element for element with the 16-bit parameter buffer, so a
    shard's range means the same elements in both."""
    return [torch.as_strided(flat, shape, stride, flat.storage_offset() + offset)
            for shape, stride, offset in zip(layout.shapes, layout.strides, layout.offsets)]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in host memory (fp32 when it is 16-bit), pinned when CUDA copies to and from it."""
    dtype = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
    return torch.empty(tensor.shape, dtype=dtype, pin_memory=torch.cuda.is_available()).copy_(tensor)


_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroOptimizer:
    """ZeRO-1: optimizer state and fp32 master weights sharded evenly over the data group.

    This rank's parameters (all its chunks) and gradients become views into two flat buffers (as
    DDP's ``gradient_as_bucket_view``), so reduce-scatter reads the gradients where
    autograd wrote them and all-gather writes the parameters where the model reads
    them. In float32 the master shard *is* this rank's slice of the parameters;
    in bf16/fp16 it is an fp32 copy of that slice alone.

    ``offload`` (ZeRO-Offload): the fp32 master shard, its gradient and the optimizer state
    live in host memory (pinned under CUDA) and the optimizer steps there; the device keeps
    the parameters and the reduced gradient shard, which is copied over once per step.
    """

    sharded = True

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto", *, offload: bool = False) -> None:
        self.params, self.group, self.backend, self.offload = params, data_group, backend, offload
        # offload's copies to and from the host (on a side stream under CUDA); without offload plain copies
        self.host = HostTransfers(params[0].device if params and offload else torch.device("cpu"))
        self.data_size, self.data_rank = data_size, data_rank
        self._index = {id(p): i for i, p in enumerate(params)}
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params else torch.float32
        if any(p.dtype != dtype for p in params):
            raise TypeError(f"ZeRO-1 needs one parameter dtype per pipe rank, got "
                            f"{sorted({str(p.dtype) for p in params})}")
        self.layout = kernels.FlatLayout.from_tensors(params)
        self.shard_size = -(-self.layout.total // data_size)  # padded: every rank owns an equal shard
        self.low_precision = dtype != torch.float32 and dtype != torch.float64
        self.grad_dtype = torch.float32 if self.low_precision else dtype  # 16-bit gradients accumulate in fp32
        self.device = device
        self.param_flat = torch.zeros(self.shard_size * data_size, dtype=dtype, device=device)
        with torch.no_grad():
            for p, view in zip(params, kernels.views(self.param_flat, self.layout)):
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
        lo = data_rank * self.shard_size
        self._range = (lo, lo + self.shard_size)
        own = self.param_flat[lo:lo + self.shard_size]
        self.shard = torch.nn.Parameter(self._master_copy(own))
        self.separate_master = self.shard.data_ptr() != own.data_ptr()
        """Whether the master shard is a copy (fp32, on the host, ZeRO-3's) rather than the parameters' slice."""
        self._attach_grads()
        self.shard.grad = _host_copy(own).zero_() if offload else self.reduced_grad
        # reduce-scatter's output: a collective must not write into the buffer it reads
        self._scattered = torch.empty(self.shard_size if data_size > 1 else 0, dtype=self.grad_dtype, device=device)
        self.optimizer = factory([self.shard])

    def _master_copy(self, own: torch.Tensor) -> torch.Tensor:
        """The master shard over this rank's slice ``own`` of the parameters: the slice itself in
        float32, an fp32 copy in 16-bit, a host copy with offload."""
        if self.offload:
            return _host_copy(own)
        return own.detach().float().clone() if self.low_precision else own

    def _attach_grads(self) -> None:
        """One full-size flat gradient buffer for the whole run; the shard's gradient is its slice."""
        self.grad_flat = torch.zeros_like(self.param_flat, dtype=self.grad_dtype)
        self._grad_views = _views_at(self.grad_flat, self.layout)  # element for element with the parameters
        for p, grad in zip(self.params, self._grad_views):
            p.grad = None if self.low_precision else grad  # float32: autograd writes in place
        if self.low_precision:
            self._hooks = accumulate_in_fp32(self.params, lambda i: self._grad_views[i],
                                              lambda i, grad: self._grad_views[i].copy_(grad))
        lo, hi = self._range
        self.reduced_grad = self.grad_flat[lo:hi]  # this rank's slice of the flat gradient, reduced in place

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor holding ``param``'s gradient of this step (fp32 in 16-bit training)."""
        return self._grad_views[self._index[id(param)]]

    def reduce_grads(self) -> None:
        """Reduce-scatter the gradients: this rank receives the mean of its shard."""
        if self.data_size > 1:
            _reduce_scatter(self._scattered, self.grad_flat, group=self.group)
            self.reduced_grad.copy_(self._scattered).mul_(1.0 / self.data_size)
        self._copy_grad_to_host()

    def _copy_grad_to_host(self) -> None:
        """Offload: the reduced shard's gradient goes to the host, where the step and the norms read it."""
        if self.offload:
            self.host.to_host(self.shard.grad, self.reduced_grad)  # (on CUDA: started, not awaited)

    def gather_params(self) -> None:
        """The whole parameters are always in place (ZeRO-3 gathers them here)."""

    def begin_step(self) -> None:
        """Nothing to gather: the whole parameters are always in place."""

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        """The whole parameters are always in place."""

    def weight_grads_done(self) -> None:
        """A model stage finished a micro-batch's parameter gradients: nothing to do before the step's end."""

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """This rank's slices of the gradient (only the parameters in ``counted``, if given)."""
        self.host.host_ready()
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
        self.host.host_ready()
        if grad_coef != 1.0:
            self.shard.grad.mul_(grad_coef)
        self.optimizer.step()
        lo, hi = self._range
        own = self.param_flat[lo:hi]
        if self.separate_master:  # (in float32 without offload the shard is this very slice)
            self.host.to_device(own, self.shard.detach())
        if self.data_size > 1:  # in place: this rank's input is its own slice of the output
            _all_gather(self.param_flat, own, group=self.group)

    def _own_parameters(self) -> torch.Tensor:
        """This rank's range of the (whole) parameters."""
        lo, hi = self._range
        return self.param_flat[lo:hi]

    def sync_master_from_params(self) -> None:
        """After loading model weights alone: the fp32 master shard follows them."""
        if self.separate_master:
            lo, hi = self._range
            with torch.no_grad():
                self.shard.copy_(self.param_flat[lo:hi])

    def zero_grad(self) -> None:
        self.grad_flat.zero_()  # the gradients (and the shard's) are views of it and stay in place

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind (the flat buffers whole, padding included); all of it
        lives between steps too."""
        return self._memory([self.grad_flat])

    def _memory(self, device_grads: list[torch.Tensor | None]) -> dict[str, int]:
        """Bytes by kind; with offload the host's master, gradient and optimizer state under ``*_host``."""
        master = [self.shard] if self.separate_master else []
        host = {"master_weights": master, "gradients": [self.shard.grad], "optimizer": state_tensors(self.optimizer)}
        if not self.offload:
            return storage_bytes({"parameters": self.params, "gradients": device_grads, "optimizer": host["optimizer"],
                                  "master_weights": master, "buffers": [self._scattered]})
        report = storage_bytes({"parameters": self.params, "gradients": device_grads, "buffers": [self._scattered]})
        report.update(optimizer=0, master_weights=0)
        report.update({f"{kind}_host": size for kind, size in storage_bytes(host).items()})
        return report

    # --- checkpoints: state per parameter --------------------------------------------
    def elementwise_keys(self) -> list[str]:
        state = self.optimizer.state.get(self.shard, {})
        keys = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == self.shard.shape}
        return sorted(keys | ({MASTER} if self.separate_master else set()))

    def local_param_states(self) -> list[tuple[int, int, int, ParamState]]:
        """(parameter index, first element, end element, state of those elements, flattened)
        for each parameter the shard overlaps: views of the shard's state, so saving them
        together writes each state tensor once, exactly the shard."""
        keys, state = self.elementwise_keys(), self.optimizer.state.get(self.shard, {})
        flat = {k: self.shard.detach() if k == MASTER else state[k] for k in keys}
        scalars = {k: v for k, v in state.items() if k not in keys}
        lo, hi = self._range
        pieces = []
        for i, (offset, numel) in enumerate(zip(self.layout.offsets, self.layout.numels)):
            start, end = max(offset, lo), min(offset + numel, hi)
            if start < end:
                piece = ParamState({k: v[start - lo:end - lo] for k, v in flat.items()}, scalars)
                pieces.append((i, start - offset, end - offset, piece))
        return pieces

    def load_param_states(self, read: Callable[[int], ParamState], hyperparameters: dict[str, Any]) -> None:
        """Assemble this rank's shard of the state from ``read(index)`` (saved at any sharding).

        Only the parameters overlapping the shard are read; a shard of padding alone
        still reads one parameter, for the per-parameter values (``step``).
        """
        if not self.params:
            return
        lo, hi = self._range
        spans = zip(self.layout.offsets, self.layout.numels)
        pieces = [(i, max(o, lo), min(o + n, hi), o) for i, (o, n) in enumerate(spans) if max(o, lo) < min(o + n, hi)]
        first = read(pieces[0][0] if pieces else 0)
        shard = {k: torch.zeros(self.shard_size, dtype=v.dtype, device=self.shard.device)
                 for k, v in first.elementwise.items()}
        for i, start, end, offset in pieces:
            saved = read(i)
            check_scalars(first.scalars, saved.scalars, f"parameter {i}")
            if saved.elementwise.keys() != shard.keys():
                raise ValueError(f"parameter {i} has optimizer state {sorted(saved.elementwise)}, parameter "
                                 f"{pieces[0][0]} {sorted(shard)}; the checkpoint mixes optimizers")
            for key, value in saved.elementwise.items():
                shard[key][start - lo:end - lo].copy_(value.reshape(-1)[start - offset:end - offset])
        fp32 = shard.pop(MASTER, None)
        if self.separate_master:
            with torch.no_grad():
                self.shard.copy_(fp32 if fp32 is not None else self._own_parameters())
        scalars = {k: v.clone() for k, v in first.scalars.items()}  # (``read`` may map a file)
        state = {0: {**scalars, **shard}} if shard or scalars else {}
        load_torch_state(self.optimizer, state, hyperparameters)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints of format 1 (one file per rank), at the layout that wrote them."""
        if state.get("data_size") != self.data_size:
            raise ValueError(f"the ZeRO-1 optimizer state was saved with data={state.get('data_size')} shards, "
                             f"this run has data={self.data_size}; resume with the same topology.data or "
                             "load model weights only (load_optimizer_states=False)")
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.shard.copy_(state["shard"])
