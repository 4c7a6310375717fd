"""``zero.stage: 2``: ZeRO-1's sharded optimizer state and master weights, and each data rank
keeps only its shard of the reduced gradient between steps.

When the gradients are reduced:

- once per step, at ReduceGrads (default): gradients accumulate full size while the step
  runs (autograd hands over whole tensors; 16-bit ones are added into fp32 as in ZeRO-1), in a
  flat buffer made by the step's first gradient; one reduce-scatter moves it into the fp32 shard
  and frees it, so the optimizer step, the parameters' all-gather and the next forwards run
  without it. One reduction per step, the full-size buffer alive from a rank's first backward
  to its last.
- bucket by bucket while each backward runs (``zero.reduce_every_micro_batch``, buckets.py):
  no full-size buffer at all, only the shard and a few buckets of ``zero.bucket_elements``
  elements; m times the once-per-step traffic. Tied and sequence-parallel parameters, which
  other pipe or tensor ranks sum before the data reduction, keep a whole-size fp32 gradient
  until the step's end, and are reduced bucket by bucket then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipegrid.pipe.zero.buckets import GradientBuckets
from pipegrid.pipe.zero.common import Factory, accumulate_in_fp32
from pipegrid.pipe.zero.stage1 import ZeroOptimizer, _reduce_scatter, _views_at

DEFAULT_BUCKET_ELEMENTS = 1 << 24
"""zero.bucket_elements' default: 64 MiB of fp32 per bucket, large enough for a reduction to run
at link speed (NCCL reaches its bus bandwidth from a few MiB), small beside a stage's gradients
(a 9B-parameter stage's fp32 gradients are 36 GB). DeepSpeed's 5e8 (2 GB) is sized for fewer,
larger launches; Megatron's DDP buckets hold 40M elements."""


class Zero2Optimizer(ZeroOptimizer):
    """ZeRO-2: ZeRO-1 plus gradients sharded over the data group outside the step's backwards.

    ``whole_grads``: ids of parameters whose gradient the step needs whole after the last
    backward (tied layers' copies, summed over pipe ranks before ReduceGrads); they matter
    only with ``reduce_every_micro_batch``, whose buckets hold ``bucket_elements`` elements.
    """

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto", *, reduce_every_micro_batch: bool = False,
                 whole_grads: frozenset[int] = frozenset(), offload: bool = False,
                 bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> None:
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self._whole_ids = whole_grads
        self.bucket_elements = bucket_elements
        super().__init__(params, factory, data_group, data_size, data_rank, backend, offload=offload)
        # one reduce-scatter a step, straight into a fresh shard; per micro-batch the buckets' owners add theirs
        self._scattered = torch.empty(0, dtype=self.grad_dtype, device=self.device)

    def _attach_grads(self) -> None:
        """No gradient between steps: the step's first gradient makes the full-size buffer (or the
        first bucket), the reduction the shard's."""
        self.grad_flat: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        self.reduced_grad: torch.Tensor | None = None  # type: ignore[assignment]
        self.step_gradient_bytes = 0
        """The most gradient bytes beside the shard while the last step's backwards ran: the
        full-size buffer, or (per micro-batch) the buckets and the whole tied gradients."""
        self._gradient_bytes_at_step = 0
        self._whole = [i for i, p in enumerate(self.params) if id(p) in self._whole_ids]
        self._held: dict[int, torch.Tensor] = {}  # per-micro-batch mode: tied gradients, whole, till ReduceGrads
        if self.reduce_every_micro_batch:
            self._attach_buckets()
        elif self.low_precision:
            self._hooks = accumulate_in_fp32(self.params, lambda i: self._full_grads()[i], lambda i, grad: None)
        else:
            self._hooks = [p.register_post_accumulate_grad_hook(self._adopt_grad(i)) for i, p in enumerate(self.params)]

    def _attach_buckets(self) -> None:
        """Per micro-batch: each gradient goes into its bucket(s) as autograd finishes it (buckets.py)."""
        whole = set(self._whole)

        def buckets(indices: list[int]) -> GradientBuckets:
            return GradientBuckets(self.layout, indices, self.shard_size, self.group, self.data_size,
                                   self.data_rank, self.grad_dtype, self.device, self.bucket_elements, self._deliver)
        self._buckets = buckets([i for i in range(len(self.params)) if i not in whole])
        self._whole_buckets = buckets(self._whole)

        def hook(i: int) -> Callable[[torch.Tensor], None]:
            def into_bucket(param: torch.Tensor) -> None:
                grad, param.grad = param.grad, None
                if i in whole:
                    self.grad_of(param).add_(grad)
                else:
                    self._buckets.add(i, grad)
            return into_bucket
        self._hooks = [p.register_post_accumulate_grad_hook(hook(i)) for i, p in enumerate(self.params)]

    def _deliver(self, lo: int, summed: torch.Tensor) -> None:
        """A bucket's sum over data, at layout offset ``lo`` of this rank's shard, into the shard's gradient."""
        start = lo - self._range[0]
        self._shard_grad()[start:start + summed.numel()].add_(summed)

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
        if self.reduce_every_micro_batch:
            if i not in self._held:
                if i not in self._whole:
                    raise RuntimeError(f"zero.reduce_every_micro_batch reduces parameter {i}'s gradient bucket by "
                                       "bucket, so no whole gradient of it exists; only tied and sequence-parallel "
                                       "parameters (whole_grads) keep one")
                self._held[i] = torch.zeros(self.layout.numels[i], dtype=self.grad_dtype,
                                            device=self.device).view(self.layout.shapes[i])
            return self._held[i]
        return self._full_grads()[i]

    def weight_grads_done(self) -> None:
        """Per-micro-batch mode: reduce what is left in the buckets (parameters that got no gradient)."""
        if self.reduce_every_micro_batch:
            self._buckets.flush()

    def reduce_grads(self) -> None:
        """Reduce the step's gradients into the shard (per micro-batch: what is left of them), then average."""
        if self.reduce_every_micro_batch:
            self._reduce_last_buckets()
        else:
            self._scatter_into_shard()
        shard = self._shard_grad()
        if self.data_size > 1:
            shard.mul_(1.0 / self.data_size)
        self._gradient_bytes_at_step = shard.untyped_storage().nbytes()
        self._copy_grad_to_host()

    def _reduce_last_buckets(self) -> None:
        """The tied gradients, summed over their pipe ranks by now, through their buckets; then the
        check that every data rank issued the same buckets in the same order."""
        self._buckets.flush()
        held = sum(t.untyped_storage().nbytes() for t in self._held.values())
        for i in self._whole:
            self._whole_buckets.add(i, self.grad_of(self.params[i]))
        self._whole_buckets.flush()
        self._held.clear()
        self.step_gradient_bytes = held + max(self._buckets.peak_bytes, self._whole_buckets.peak_bytes)
        self._buckets.reset_peak()
        self._whole_buckets.reset_peak()
        self._buckets.check_order(f"zero.reduce_every_micro_batch, data rank {self.data_rank}")

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
        if self.reduce_every_micro_batch:
            self._buckets.discard()
            self._whole_buckets.discard()
        self.reduced_grad = None
        if not self.offload:
            self.shard.grad = None
        self._held.clear()

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind; gradients: what the last optimizer step held (the shard), as
        they live only within a step; ``step_gradient_bytes`` has what the backwards held beside it."""
        report = self._memory([self.reduced_grad, self.grad_flat, *self._held.values()])
        report["gradients"] = max(report["gradients"], self._gradient_bytes_at_step)
        return report
