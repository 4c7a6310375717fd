"""``zero.stage: 2``: ZeRO-1's sharded optimizer state and master weights, and each data rank
keeps only its shard of the reduced gradient between steps.

Gradients still accumulate full size while a step runs (autograd hands over whole tensors;
16-bit ones are added into fp32 as in ZeRO-1), in a flat buffer made by the step's first
gradient. The reduce-scatter then moves that buffer into the fp32 shard and the buffer is
freed, so the optimizer step, the parameters' all-gather and the next forwards run without
it. When it runs:

- once per step, at ReduceGrads (default): one reduction per step, the full-size buffer
  alive from a rank's first backward to its last;
- after every micro-batch's parameter gradients of a model stage
  (``zero.reduce_every_micro_batch``): one reduction per micro-batch and chunk, the buffer
  alive only during one backward. Tied parameters, which the pipe ranks holding a copy sum
  before the data reduction, keep a whole-size fp32 gradient until the step's end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipegrid.pipe.zero.common import Factory, accumulate_in_fp32
from pipegrid.pipe.zero.stage1 import ZeroOptimizer, _reduce_scatter, _views_at


class Zero2Optimizer(ZeroOptimizer):
    """ZeRO-2: ZeRO-1 plus gradients sharded over the data group outside the step's backwards.

    ``whole_grads``: ids of parameters whose gradient the step needs whole after the last
    backward (tied layers' copies, summed over pipe ranks before ReduceGrads); they matter
    only with ``reduce_every_micro_batch``.
    """

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto", *, reduce_every_micro_batch: bool = False,
                 whole_grads: frozenset[int] = frozenset(), offload: bool = False) -> None:
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self._whole_ids = whole_grads
        super().__init__(params, factory, data_group, data_size, data_rank, backend, offload=offload)
        if not reduce_every_micro_batch:  # one reduce-scatter a step, straight into a fresh shard
            self._scattered = torch.empty(0, dtype=self.grad_dtype, device=self.device)

    def _attach_grads(self) -> None:
        """No gradient between steps: the step's first gradient makes the full-size buffer, the
        reduction the shard's."""
        self.grad_flat: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        self.reduced_grad: torch.Tensor | None = None  # type: ignore[assignment]
        self.step_gradient_bytes = 0
        """Bytes of the full-size gradient buffer while the last step's backwards ran."""
        self._gradient_bytes_at_step = 0
        self._whole = [i for i, p in enumerate(self.params) if id(p) in self._whole_ids]
        self._held: dict[int, torch.Tensor] = {}  # per-micro-batch mode: tied gradients, whole, till ReduceGrads
        if self.low_precision:
            self._hooks = accumulate_in_fp32(self.params, lambda i: self._full_grads()[i], lambda i, grad: None)
        else:
            self._hooks = [p.register_post_accumulate_grad_hook(self._adopt_grad(i)) for i, p in enumerate(self.params)]

    def _adopt_grad(self, i: int) -> Callable[[torch.Tensor], None]:
        """float32: the step's first gradient of parameter i is added into the buffer, whose view
        then becomes ``.grad``, so autograd adds the later micro-batches in place (as in ZeRO-1)."""
        def adopt(param: torch.Tensor) -> None:
            view = self._full_grads()[i]
            if param.grad.data_ptr() != view.data_ptr():
                view.add_(param.grad)
                param.grad = view
        return adopt

    def _full_grads(self) -> list[torch.Tensor]:
        """Views of this step's full-size gradient buffer (made, zeroed, on first use)."""
        if self.grad_flat is None:
            self.grad_flat = torch.zeros(self.shard_size * self.data_size, dtype=self.grad_dtype, device=self.device)
            self._grad_views = _views_at(self.grad_flat, self.layout)
            self.step_gradient_bytes = self.grad_flat.untyped_storage().nbytes()
        return self._grad_views

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """``param``'s whole gradient of this step (asked for tied layers, after the backwards)."""
        i = self._index[id(param)]
        if self.reduce_every_micro_batch and i in self._whole:
            if i not in self._held:
                self._held[i] = torch.zeros(self.layout.numels[i], dtype=self.grad_dtype,
                                            device=self.device).view(self.layout.shapes[i])
            return self._held[i]
        return self._full_grads()[i]

    def weight_grads_done(self) -> None:
        """Per-micro-batch mode: reduce-scatter what this micro-batch added, keep tied gradients whole."""
        if not self.reduce_every_micro_batch:
            return
        views = self._full_grads()  # (made if this stage had no gradient: every data rank joins)
        for i in self._whole:
            self.grad_of(self.params[i]).add_(views[i])
            views[i].zero_()
        self._scatter_into_shard()

    def reduce_grads(self) -> None:
        """Reduce-scatter the step's gradients into the shard (what is left of them), then average."""
        if self.reduce_every_micro_batch:
            if self._whole:  # the tied gradients, summed over their pipe ranks by now
                views = self._full_grads()
                for i in self._whole:
                    views[i].copy_(self.grad_of(self.params[i]))
                self._held.clear()
                self._scatter_into_shard()
        else:
            self._scatter_into_shard()
        shard = self._shard_grad()
        if self.data_size > 1:
            shard.mul_(1.0 / self.data_size)
        self._gradient_bytes_at_step = shard.untyped_storage().nbytes()
        self._copy_grad_to_host()

    def _shard_grad(self) -> torch.Tensor:
        """This step's reduced gradient shard (made, zeroed, on first use); the optimizer's unless offloaded."""
        if self.reduced_grad is None:
            self.reduced_grad = torch.zeros(self.shard_size, dtype=self.grad_dtype, device=self.device)
            if not self.offload:
                self.shard.grad = self.reduced_grad
        return self.reduced_grad

    def _scatter_into_shard(self) -> None:
        """Add the sum over data of the full-size buffer's shard into ``reduced_grad``; free the buffer."""
        self._full_grads()
        flat, fresh = self.grad_flat, self.reduced_grad is None
        shard = self._shard_grad()
        if self.data_size == 1:
            lo, hi = self._range
            shard.add_(flat[lo:hi])
        elif fresh:  # nothing to add to: the collective writes the shard itself
            _reduce_scatter(shard, flat, group=self.group)
        else:
            _reduce_scatter(self._scattered, flat, group=self.group)
            shard.add_(self._scattered)
        self._free_full_grads()

    def _free_full_grads(self) -> None:
        self.grad_flat, self._grad_views = None, []
        for p in self.params:  # (float32: views of the buffer)
            p.grad = None

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        self._shard_grad()  # (a step whose stage had no gradient at all)
        return super().grads(counted)

    def step(self, grad_coef: float = 1.0) -> None:
        self._shard_grad()
        super().step(grad_coef)

    def zero_grad(self) -> None:
        """Free the step's gradients: between steps this rank holds none."""
        self._free_full_grads()
        self.reduced_grad = None
        if not self.offload:
            self.shard.grad = None
        self._held.clear()

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind; gradients: what the last optimizer step held (the shard), as
        they live only within a step; ``step_gradient_bytes`` has the full-size buffer's."""
        report = self._memory([self.reduced_grad, self.grad_flat, *self._held.values()])
        report["gradients"] = max(report["gradients"], self._gradient_bytes_at_step)
        return report
