"""Optimizers over the data axis: fp32 master weights, gradient reduction, ZeRO-1.

``ReplicatedOptimizer`` (``zero.stage: 0``) all-reduces gradients and keeps the full
optimizer state on every data rank. ``ZeroOptimizer`` (``zero.stage: 1``) keeps one
flat fp32 master copy split evenly over the data group: gradients are
reduce-scattered into the shards, the wrapped torch optimizer steps on this rank's
shard only, and the updated parameters are all-gathered back. Both keep fp32 master
weights when the model runs in bf16/fp16, move bytes through pipegrid.kernels, and
hand checkpoints their state per parameter (``ParamState``), whatever the sharding.

In bf16/fp16 the gradients accumulate in fp32 (as Megatron's ``main_grad`` and
DeepSpeed's bf16 optimizer do): each micro-batch's 16-bit gradient is added into an
fp32 buffer as soon as autograd has it, and freed. Summed in 16 bits, the micro-batches
and a tied layer's copies add up in another order on every layout, and the rounding
differs; in fp32 every layout trains alike, as in float32.
"""

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
        flat = kernels.pack(bucket, dtype=dtype, scale=scale, backend=backend)
        if group is not None:  # None: a one-rank group, nothing to sum
            dist.all_reduce(flat, group=group)
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


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _accumulate_in_fp32(params: list[torch.nn.Parameter], target: Callable[[int], torch.Tensor | None],
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


def _ensure_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


def _load_torch_state(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]],
                      hyperparameters: dict[str, Any]) -> None:
    """Give ``optimizer`` per-parameter ``state`` (by parameter index) and the saved
    hyperparameters (the learning rate a scheduler moved), through torch's own loader,
    which casts each value to its parameter's dtype and device as the optimizer wants."""
    template = optimizer.state_dict()["param_groups"]
    saved = {k: v for k, v in hyperparameters.items() if k not in _BUILD_KEYS}
    optimizer.load_state_dict({"state": state, "param_groups": [{**group, **saved} for group in template]})


def _check_scalars(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor], where: str) -> None:
    if first.keys() != other.keys() or any(not torch.equal(first[k], other[k]) for k in first):
        raise ValueError(f"{where}: the per-parameter optimizer values {sorted(first)} differ between parameters "
                         "that ZeRO-1 steps as one shard; resume this checkpoint with zero.stage=0")


class ReplicatedOptimizer:
    """Every data rank holds the whole optimizer state (``zero.stage: 0``)."""

    sharded = False

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 backend: str = "auto") -> None:
        self.params, self.group, self.data_size, self.backend = params, data_group, data_size, backend
        self._index = {id(p): i for i, p in enumerate(params)}
        low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        self.master = ([torch.nn.Parameter(p.detach().float().clone()) for p in params]
                       if low_precision else params)
        if low_precision:  # the master copy's .grad is the fp32 gradient, made by the first micro-batch
            def start(i: int, grad: torch.Tensor) -> None:
                self.master[i].grad = grad
            self._hooks = _accumulate_in_fp32(params, lambda i: self.master[i].grad, start)
        self.optimizer = factory(self.master)
        self._step_memory: dict[str, int] | None = None
        self._measured_states = -1

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor holding ``param``'s gradient of this step (fp32 in 16-bit training)."""
        return _ensure_grads([self.master[self._index[id(param)]]])[0]

    def reduce_grads(self) -> None:
        """Average the gradients (the master copy's, fp32, in 16-bit training) over the data group."""
        grads = _ensure_grads(self.master)
        if self.data_size > 1:
            all_reduce_flat(grads, self.group, scale=1.0 / self.data_size, backend=self.backend)

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """Master gradients (of the parameters whose ``id`` is in ``counted``, if given)."""
        pairs = zip(self.params, _ensure_grads(self.master))
        return [g for p, g in pairs if counted is None or id(p) in counted]

    def step(self, grad_coef: float = 1.0) -> None:
        if grad_coef != 1.0:
            torch._foreach_mul_(self.grads(), grad_coef)
        self.optimizer.step()
        if len(self.optimizer.state) != self._measured_states:  # gradients are alive only now
            self._step_memory, self._measured_states = self._allocated(), len(self.optimizer.state)
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
        """Storage bytes by kind; gradients exist only within a step, so after the first
        step this is what the last step that changed the state layout held."""
        return dict(self._step_memory) if self._step_memory is not None else self._allocated()

    def _allocated(self) -> dict[str, int]:
        master = [] if self.master is self.params else self.master
        return storage_bytes({"parameters": self.params, "gradients": [p.grad for p in self.master],
                              "optimizer": _state_tensors(self.optimizer), "master_weights": master,
                              "buffers": []})

    # --- checkpoints: state per parameter --------------------------------------------
    def elementwise_keys(self) -> list[str]:
        keys = {k for p in self.master for k, v in self.optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape}
        return sorted(keys | ({MASTER} if self.master is not self.params else set()))

    def local_param_states(self) -> list[tuple[int, int, int, ParamState]]:
        """(parameter index, first element, end element, its state flattened) for every
        parameter: views, no copies."""
        keys, pieces = self.elementwise_keys(), []
        for i, master in enumerate(self.master):
            state = {**self.optimizer.state.get(master, {}), MASTER: master.detach()}
            pieces.append((i, 0, master.numel(), ParamState({k: state[k].reshape(-1) for k in keys if k in state},
                                            {k: v for k, v in state.items() if k not in keys and k != MASTER})))
        return pieces

    def load_param_states(self, read: Callable[[int], ParamState], hyperparameters: dict[str, Any]) -> None:
        """Load every parameter's state from ``read(index)`` (saved at any sharding); the
        values read may be views of a memory-mapped file, so only copies are kept."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for i, (param, master) in enumerate(zip(self.params, self.master)):
                saved = read(i)
                elementwise = dict(saved.elementwise)
                fp32 = elementwise.pop(MASTER, None)
                if master is not param:
                    master.copy_(fp32.view_as(master) if fp32 is not None else param)
                if elementwise or saved.scalars:  # copies: ``read`` may hand out views of a mapped file
                    values = {**saved.scalars, **{k: v.view_as(master) for k, v in elementwise.items()}}
                    state[i] = {k: v.clone() for k, v in values.items()}
        _load_torch_state(self.optimizer, state, hyperparameters)
        self._measured_states = -1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints of format 1 (one file per rank), at the layout that wrote them."""
        self.optimizer.load_state_dict(state["optimizer"])
        if "master" in state and self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.master, state["master"])


def _views_at(flat: torch.Tensor, layout: kernels.FlatLayout) -> list[torch.Tensor]:
    """Views of ``flat`` at ``layout``'s element offsets, whatever ``flat``'s dtype: the fp32
    gradient buffer lines up element for element with the 16-bit parameter buffer, so a
    shard's range means the same elements in both."""
    return [torch.as_strided(flat, shape, stride, flat.storage_offset() + offset)
            for shape, stride, offset in zip(layout.shapes, layout.strides, layout.offsets)]


_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroOptimizer:
    """ZeRO-1: optimizer state and fp32 master weights sharded evenly over the data group.

    This rank's parameters (all its chunks) and gradients become views into two flat buffers (as
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
        self._index = {id(p): i for i, p in enumerate(params)}
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params else torch.float32
        if any(p.dtype != dtype for p in params):
            raise TypeError(f"ZeRO-1 needs one parameter dtype per pipe rank, got "
                            f"{sorted({str(p.dtype) for p in params})}")
        self.layout = kernels.FlatLayout.from_tensors(params)
        self.shard_size = -(-self.layout.total // data_size)  # padded: every rank owns an equal shard
        self.low_precision = dtype != torch.float32 and dtype != torch.float64
        grad_dtype = torch.float32 if self.low_precision else dtype  # 16-bit gradients accumulate in fp32
        self.param_flat = torch.zeros(self.shard_size * data_size, dtype=dtype, device=device)
        self.grad_flat = torch.zeros(self.shard_size * data_size, dtype=grad_dtype, device=device)
        self._grad_views = _views_at(self.grad_flat, self.layout)  # element for element with the parameters
        with torch.no_grad():
            for p, view, grad in zip(params, kernels.views(self.param_flat, self.layout), self._grad_views):
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
                p.grad = None if self.low_precision else grad  # float32: autograd writes in place
        if self.low_precision:
            self._hooks = _accumulate_in_fp32(params, lambda i: self._grad_views[i],
                                              lambda i, grad: self._grad_views[i].copy_(grad))
        lo = data_rank * self.shard_size
        self._range = (lo, lo + self.shard_size)
        own = self.param_flat[lo:lo + self.shard_size]
        self.shard = torch.nn.Parameter(own.detach().float().clone() if self.low_precision else own)
        self.shard.grad = self.grad_flat[lo:lo + self.shard_size]  # this rank's slice of the flat gradient
        # reduce-scatter's output: a collective must not write into the buffer it reads
        self._scattered = torch.empty(self.shard_size if data_size > 1 else 0, dtype=grad_dtype, device=device)
        self.optimizer = factory([self.shard])

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor holding ``param``'s gradient of this step (fp32 in 16-bit training)."""
        return self._grad_views[self._index[id(param)]]

    def reduce_grads(self) -> None:
        """Reduce-scatter the gradients: this rank receives the mean of its shard."""
        if self.data_size > 1:
            _reduce_scatter(self._scattered, self.grad_flat, group=self.group)
            self.shard.grad.copy_(self._scattered).mul_(1.0 / self.data_size)

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
        own = self.param_flat[lo:hi]
        if self.low_precision:
            own.copy_(self.shard.detach())  # (in float32 the shard is this very slice)
        if self.data_size > 1:  # in place: this rank's input is its own slice of the output
            _all_gather(self.param_flat, own, group=self.group)

    def sync_master_from_params(self) -> None:
        """After loading model weights alone: the fp32 master shard follows them."""
        if self.low_precision:
            lo, hi = self._range
            with torch.no_grad():
                self.shard.copy_(self.param_flat[lo:hi])

    def zero_grad(self) -> None:
        self.grad_flat.zero_()  # the gradients (and the shard's) are views of it and stay in place

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind (the flat buffers whole, padding included); all of it
        lives between steps too."""
        master = [self.shard] if self.low_precision else []
        return storage_bytes({"parameters": self.params, "gradients": [self.grad_flat],
                              "optimizer": _state_tensors(self.optimizer), "master_weights": master,
                              "buffers": [self._scattered]})

    # --- checkpoints: state per parameter --------------------------------------------
    def elementwise_keys(self) -> list[str]:
        state = self.optimizer.state.get(self.shard, {})
        keys = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == self.shard.shape}
        return sorted(keys | ({MASTER} if self.low_precision else set()))

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
            _check_scalars(first.scalars, saved.scalars, f"parameter {i}")
            if saved.elementwise.keys() != shard.keys():
                raise ValueError(f"parameter {i} has optimizer state {sorted(saved.elementwise)}, parameter "
                                 f"{pieces[0][0]} {sorted(shard)}; the checkpoint mixes optimizers")
            for key, value in saved.elementwise.items():
                shard[key][start - lo:end - lo].copy_(value.reshape(-1)[start - offset:end - offset])
        fp32 = shard.pop(MASTER, None)
        if self.low_precision:
            with torch.no_grad():
                self.shard.copy_(fp32 if fp32 is not None else self.param_flat[lo:hi])
        scalars = {k: v.clone() for k, v in first.scalars.items()}  # (``read`` may map a file)
        state = {0: {**scalars, **shard}} if shard or scalars else {}
        _load_torch_state(self.optimizer, state, hyperparameters)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints of format 1 (one file per rank), at the layout that wrote them."""
        if state.get("data_size") != self.data_size:
            raise ValueError(f"the ZeRO-1 optimizer state was saved with data={state.get('data_size')} shards, "
                             f"this run has data={self.data_size}; resume with the same topology.data or "
                             "load model weights only (load_optimizer_states=False)")
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.shard.copy_(state["shard"])
