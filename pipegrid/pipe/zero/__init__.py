"""Optimizer state over the data axis: fp32 master weights, gradient reduction, ZeRO.

``ReplicatedOptimizer`` (``zero.stage: 0``) all-reduces gradients and keeps the full
optimizer state on every data rank. ``ZeroOptimizer`` (``zero.stage: 1``) keeps one
flat fp32 master copy split evenly over the data group: gradients are
reduce-scattered into the shards, the wrapped torch optimizer steps on this rank's
shard only, and the updated parameters are all-gathered back. Both keep fp32 master
weights when the model runs in bf16/fp16, move bytes through pipegrid.kernels, and
hand checkpoints their state per parameter (``ParamState``), whatever the sharding.
``Zero2Optimizer`` (``zero.stage: 2``) also keeps only the reduced gradient's shard outside
the backwards (inside them too, plus a few buckets, with ``zero.reduce_every_micro_batch``:
buckets.py), and ``Zero3Optimizer`` (``zero.stage: 3``) only the master shard between
steps, gathering the parameters at each step's start (docs/zero.md). ZeRO-1/2/3 take
``offload``: master shard and optimizer state in host memory, stepped there. All answer to
``OptimizerState``, the interface the engine's ``GradientUpdate`` and checkpoints use.

In bf16/fp16 the gradients accumulate in fp32 (as Megatron's ``main_grad`` and
DeepSpeed's bf16 optimizer do): each micro-batch's 16-bit gradient is added into an
fp32 buffer as soon as autograd has it, and freed. Summed in 16 bits, the micro-batches
and a tied layer's copies add up in another order on every layout, and the rounding
differs; in fp32 every layout trains alike, as in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from pipegrid.pipe.zero.common import MASTER, Factory, ParamState, all_reduce_flat, buckets, storage_bytes
from pipegrid.pipe.zero.replicated import ReplicatedOptimizer
from pipegrid.pipe.zero.stage1 import ZeroOptimizer
from pipegrid.pipe.zero.stage2 import DEFAULT_BUCKET_ELEMENTS, Zero2Optimizer
from pipegrid.pipe.zero.stage3 import Zero3Optimizer

__all__ = ["MASTER", "OptimizerState", "ParamState", "ReplicatedOptimizer", "Zero2Optimizer", "Zero3Optimizer", "ZeroOptimizer", "all_reduce_flat",
           "buckets", "build_optimizer_state", "storage_bytes"]


class OptimizerState(Protocol):
    """A stage's parameters' gradients, master weights and optimizer state, laid out over the
    data axis one way or another; what the step and checkpoints ask of it."""

    sharded: bool
    """Whether each data rank holds only a shard (then norms and checkpoints gather over data)."""
    optimizer: torch.optim.Optimizer
    """The wrapped torch optimizer (param_groups, learning rate)."""

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The gradient this step accumulates for ``param`` (fp32 in 16-bit training)."""

    def gather_params(self) -> None:
        """Collective over data (ZeRO-3): put the whole parameters back into the model until the
        next optimizer step frees them; a no-op where they never leave."""

    def begin_step(self) -> None:
        """Collective over data (ZeRO-3): what a step needs before its first instruction (the whole
        parameters, or with ``zero.gather=per_layer`` nothing: each layer gathers its own)."""

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        """Collective over data (ZeRO-3 per layer): gather the layers holding ``params`` again (and
        free the others), post the gather of those holding ``following``."""

    def weight_grads_done(self) -> None:
        """A model stage finished one micro-batch's parameter gradients (ZeRO-2 may reduce them now;
        a collective there, called at the same point of the schedule on every data rank). With
        ``reduce_every_micro_batch`` the gradient hooks also post reductions during the backward,
        in autograd's order: every data rank must run the same graph (buckets.py)."""

    def reduce_grads(self) -> None:
        """Collective over the data axis: sum (or reduce-scatter) the step's gradients."""

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """This rank's gradients (of the parameters whose ids are in ``counted``), for norms and checks."""

    def step(self, grad_coef: float = 1.0) -> None:
        """Apply the gradients times ``grad_coef`` and update the model's parameters."""

    def zero_grad(self) -> None: ...

    def sync_master_from_params(self) -> None:
        """Copy the model's parameters into the master weights (after loading weights only)."""

    def memory(self) -> dict[str, int]:
        """Bytes held, by kind (parameters, gradients, optimizer, master, buffers)."""

    def elementwise_keys(self) -> list[str]:
        """The per-element state names (Adam's moments, ``MASTER``) a checkpoint stores."""

    def local_param_states(self) -> list[tuple[int, int, int, ParamState]]:
        """(parameter index, start, end, its state over [start, end)) for what this rank holds."""

    def load_param_states(self, read: Callable[[int], ParamState], hyperparameters: dict[str, Any]) -> None:
        """Load each held parameter's state, read whole through ``read(index)``."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the legacy per-rank format."""


def build_optimizer_state(stage: int, params: list[torch.nn.Parameter], factory: Factory, data_group: Any,
                          data_size: int, data_rank: int, backend: str, *, reduce_every_micro_batch: bool = False,
                          tied: frozenset[int] = frozenset(), offload: bool = False, gather: str = "per_step",
                          chunks: list[Any] = (), bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> OptimizerState:
    """The optimizer state ``zero.stage`` asks for (the config checks the stage's range); ``tied``:
    ids of the parameters a tied layer shares with other pipe ranks; ``offload``: master weights
    and optimizer state in host memory, stepped there (ZeRO-1/2/3); ``gather``: ZeRO-3's
    ``per_step`` or ``per_layer`` (around each use of the layers of ``chunks``, the rank's StageChunks);
    ``bucket_elements``: ZeRO-2/3's bucket size with ``reduce_every_micro_batch`` (buckets.py)."""
    if stage == 3:
        return Zero3Optimizer(params, factory, data_group, data_size, data_rank, backend,
                              reduce_every_micro_batch=reduce_every_micro_batch, whole_grads=tied, offload=offload,
                              gather=gather, chunks=chunks, bucket_elements=bucket_elements)
    if stage == 2:
        return Zero2Optimizer(params, factory, data_group, data_size, data_rank, backend,
                              reduce_every_micro_batch=reduce_every_micro_batch, whole_grads=tied, offload=offload,
                              bucket_elements=bucket_elements)
    if stage == 1:
        return ZeroOptimizer(params, factory, data_group, data_size, data_rank, backend, offload=offload)
    return ReplicatedOptimizer(params, factory, data_group, data_size, backend)
