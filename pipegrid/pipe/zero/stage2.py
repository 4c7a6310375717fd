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

from typing import Any

import torch

from pipegrid.pipe.zero.common import Factory, accumulate_in_fp32, storage_bytes, state_tensors
from pipegrid.pipe.zero.stage1 import ZeroOptimizer, _reduce_scatter, _views_at


class Zero2Optimizer(ZeroOptimizer):
    """ZeRO-2: ZeRO-1 plus gradients sharded over the data group outside the step's backwards.

    ``whole_grads``: ids of parameters whose gradient the step needs whole after the last
    backward (tied layers' copies, summed over pipe ranks before ReduceGrads); they matter
    only with ``reduce_every_micro_batch``.
    """

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto", *, reduce_every_micro_batch: bool = False,
                 whole_grads: frozenset[int] = frozenset()) -> None:
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self._whole_ids = whole_grads
        super().__init__(params, factory, data_group, data_size, data_rank, backend)

    def _attach_grads(self) -> None:
        """No full-size gradient between steps: the step's first gradient makes one."""
        self.grad_flat: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        self.step_gradient_bytes = 0
        """Bytes of the full-size gradient buffer while the last step's backwards ran."""
        self.shard.grad = torch.zeros(self.shard_size, dtype=self.grad_dtype, device=self.param_flat.device)
        self._whole = [i for i, p in enumerate(self.params) if id(p) in self._whole_ids]
        self._held: dict[int, torch.Tensor] = {}  # per-micro-batch mode: tied gradients, whole, till ReduceGrads
        # every dtype goes through the hook (float32 too): the buffer it adds into comes and goes
        self._hooks = accumulate_in_fp32(self.params, lambda i: self._full_grads()[i], lambda i, grad: None)

    def _full_grads(self) -> list[torch.Tensor]:
        """Views of this step's full-size gradient buffer (made, zeroed, on first use)."""
        if self.grad_flat is None:
            self.grad_flat = torch.zeros_like(self.param_flat, dtype=self.grad_dtype)
            self._grad_views = _views_at(self.grad_flat, self.layout)
            self.step_gradient_bytes = self.grad_flat.untyped_storage().nbytes()
        return self._grad_views

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """``param``'s whole gradient of this step (asked for tied layers, after the backwards)."""
        i = self._index[id(param)]
        if self.reduce_every_micro_batch and i in self._whole:
            if i not in self._held:
                self._held[i] = torch.zeros(self.layout.numels[i], dtype=self.grad_dtype,
                                            device=self.param_flat.device).view(self.layout.shapes[i])
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
        if self.data_size > 1:
            self.shard.grad.mul_(1.0 / self.data_size)

    def _scatter_into_shard(self) -> None:
        """Add the sum over data of the full-size buffer's shard into ``shard.grad``; free the buffer."""
        self._full_grads()
        flat = self.grad_flat
        if self.data_size > 1:
            _reduce_scatter(self._scattered, flat, group=self.group)
            self.shard.grad.add_(self._scattered)
        else:
            lo, hi = self._range
            self.shard.grad.add_(flat[lo:hi])
        self.grad_flat, self._grad_views = None, []

    def zero_grad(self) -> None:
        self.shard.grad.zero_()
        self.grad_flat, self._grad_views = None, []
        self._held.clear()

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind between steps: gradients are the shard's (and, mid-step, the
        full-size buffer's); ``step_gradient_bytes`` has the full-size buffer of the last step."""
        master = [self.shard] if self.low_precision else []
        return storage_bytes({"parameters": self.params,
                              "gradients": [self.shard.grad, self.grad_flat, *self._held.values()],
                              "optimizer": state_tensors(self.optimizer), "master_weights": master,
                              "buffers": [self._scattered]})
