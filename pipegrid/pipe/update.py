"""GradientUpdate: what happens once per step on a rank, between the last backward and the
next forward: tied and data-parallel gradient reductions, the step's loss and finite checks,
clipping over the whole grid, the optimizer, its loss scale and learning-rate schedule.

It is the executor's ``StepHooks``: the engine builds one and hands it to every ``run``.
The optimizer state's layout (replicated, ZeRO-1) is ``zero``'s business, behind the
interface of ``pipegrid.pipe.zero.OptimizerState``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels
from pipegrid.conf.schema import TrainConfig
from pipegrid.pipe.precision import LossScaler
from pipegrid.pipe.step import StepLoss
from pipegrid.pipe.zero import OptimizerState, all_reduce_flat
from pipegrid.schedules import instructions as ins
from pipegrid.tensor import is_sequence_parallel, is_tensor_sharded
from pipegrid.topology.groups import ProcessGroups

__all__ = ["GradientUpdate"]


class GradientUpdate:
    """The once-per-step work of one rank (see the module docstring); the executor's hooks."""

    def __init__(self, module: torch.nn.Module, config: TrainConfig, groups: ProcessGroups, zero: OptimizerState,
                 scaler: LossScaler, lr_scheduler: Any, device: torch.device, dtype: torch.dtype,
                 loss_rank: int, kernels_backend: str) -> None:
        self.module, self.config, self.groups, self.topology = module, config, groups, groups.topology
        self.zero, self.scaler, self.lr_scheduler = zero, scaler, lr_scheduler
        self.device, self.dtype, self.kernels_backend = device, dtype, kernels_backend
        self.pipe_rank = groups.pipe_rank
        self.loss_rank = loss_rank
        """The pipe rank that holds the last model stage (where the loss is computed)."""
        self.global_steps = 0
        self.skipped_steps = 0
        self._tied_groups = self._build_tied_groups()
        self._sequence_parallel = [p for p in module.parameters() if p.requires_grad and is_sequence_parallel(p)] \
            if self.topology.tensor > 1 else []
        """Replicated parameters that saw only this rank's tokens (norms under sequence parallelism)."""
        self._norm_ids = {id(p) for p in self._params_counted_in_norm()}

    # --- set-up ----------------------------------------------------------------
    def _build_tied_groups(self) -> dict[str, dist.ProcessGroup | None]:
        """One group per tied key and data/tensor coordinate, over the pipe ranks owning the key."""
        mine: dict[str, dist.ProcessGroup | None] = {}
        topo = self.topology
        for key, owners in sorted(self.module.tied_pipe_ranks().items()):
            for data in range(topo.data):
                for tensor in range(topo.tensor):
                    ranks = [topo.rank(pipe=r, data=data, tensor=tensor) for r in owners]
                    group = self.groups.new_group(ranks)  # every rank calls, in the same order
                    if self.groups.rank in ranks and len(ranks) > 1:
                        mine[key] = group
        return mine

    def _params_counted_in_norm(self) -> list[torch.nn.Parameter]:
        """Local parameters, each counted once in the global norm (a tied copy only on its first owner)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        skip: set[int] = set()
        for key, owners in self.module.tied_pipe_ranks().items():
            if owners[0] != self.pipe_rank:
                skip.update(id(p) for p in self.module.tied_parameters(key))
        if self.groups.coord.tensor != 0:  # replicated over the tensor group: counted on tensor rank 0 only
            skip.update(id(p) for p in params if not is_tensor_sharded(p))
        return [p for p in params if id(p) not in skip]

    # --- hooks the executor calls ------------------------------------------------
    def to_device(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.to(self.device, non_blocking=True)
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_device(v) for v in value)
        return value

    def scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from: multiplied by the fp16 loss scale when scaling."""
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def collective_peers(self, op: Any) -> list[int]:
        """Ranks a once-per-step instruction talks to (to name them when one is lost)."""
        if isinstance(op, ins.ReduceGrads):
            return self.groups.axis_ranks["data"]
        if isinstance(op, ins.ReduceTiedGrads):
            return self.groups.axis_ranks["pipe"] + self.groups.axis_ranks["tensor"] * bool(self._sequence_parallel)
        return list(range(self.topology.world_size))  # the step's loss and flags: every rank

    def reduce_tied_grads(self) -> None:
        """Sum the gradients of parameters replicated over ranks that each did part of the work: tied
        copies over their pipe ranks, and sequence-parallel ones over the tensor group (Megatron's
        ``_allreduce_layernorm_grads``), before the data reduction and clipping (which then counts
        them once, on tensor rank 0, as every replicated parameter)."""
        for key, group in sorted(self._tied_groups.items()):
            grads = [self.zero.grad_of(p) for p in self.module.tied_parameters(key)]  # fp32 in 16-bit
            all_reduce_flat(grads, group, backend=self.kernels_backend)
        if self._sequence_parallel:
            grads = [self.zero.grad_of(p) for p in self._sequence_parallel]
            all_reduce_flat(grads, self.groups.tensor_parallel_group, backend=self.kernels_backend)

    def weight_grads_done(self) -> None:
        self.zero.weight_grads_done()

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        self.zero.parameters_needed(params, following)

    def reduce_data_parallel_grads(self) -> None:
        self.zero.reduce_grads()

    def optimizer_step(self, loss: StepLoss, statistics: torch.Tensor | None) -> float:
        """Clip and apply the step's gradients (or skip the step on a non-finite loss); the step's mean loss."""
        if statistics is not None and not self.scaler.enabled:
            mean_loss, bad_loss = self._mean_over_data(statistics)
            overflow = False
        else:  # fp16 needs every rank's overflow flag: one world all-reduce
            mean_loss, bad_loss, overflow = self._world_check(loss, grads=True)
        if bad_loss and not self.scaler.enabled:
            if self.config.train.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"rank {self.groups.rank}: non-finite loss at step {self.global_steps}; the step was not "
                    "applied. Lower the learning rate, enable train.grad_clip, or set train.on_nonfinite=skip")
            overflow = True
        if overflow:  # fp16 overflow (or a skipped non-finite step): no parameter changes anywhere
            self.zero.zero_grad()
            self.scaler.update(True)
            self.skipped_steps += 1
            return mean_loss
        coef = 1.0 / self.scaler.scale
        clip = self.config.train.grad_clip
        if clip > 0:
            norm = self.global_grad_norm() * coef
            coef *= min(1.0, clip / (norm + 1e-6))
        self.zero.step(coef)
        self.zero.zero_grad()
        self.scaler.update(False)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return mean_loss

    # --- the step's loss -----------------------------------------------------------
    def mean_loss(self, loss: StepLoss) -> float:
        """The mean micro-batch loss over the global batch, on every rank (after eval, or a
        step whose OptimizerStep has it already)."""
        if loss.mean is not None:
            return loss.mean
        return self._world_check(loss, grads=False)[0]

    def _world_check(self, loss: StepLoss, grads: bool) -> tuple[float, bool, bool]:
        """One world all-reduce: the step's mean loss, any non-finite loss, any non-finite gradient."""
        owner = self.pipe_rank == self.loss_rank and self.groups.coord.tensor == 0
        values = torch.zeros(3, dtype=torch.float64)
        if owner and loss.losses:
            values[:2] = loss.local_statistics()
        if grads and self.scaler.enabled:
            values[2] = float(not bool(kernels.all_finite(self.zero.grads())))
        if dist.get_world_size() > 1:
            dist.all_reduce(values)
        if values[1] > 0:
            values[0] = math.nan
        return values[0].item() / self.topology.data, bool(values[1] > 0), bool(values[2] > 0)

    def _mean_over_data(self, statistics: torch.Tensor) -> tuple[float, bool]:
        """The statistics this replica's last stage sent down, averaged over the data axis."""
        values = statistics.clone()
        if self.topology.data > 1:
            dist.all_reduce(values, group=self.groups.data_parallel_group)
        bad = bool(values[1] > 0)
        return (math.nan if bad else values[0].item() / self.topology.data), bad

    def global_grad_norm(self) -> float:
        """L2 norm of the whole model's (scaled) gradient: each parameter once, over tensor, pipe and data shards.

        Tensor-parallel shards (:func:`~pipegrid.tensor.is_tensor_sharded`) count on every tensor rank,
        replicated parameters on tensor rank 0 only; a tied copy on its first owner.
        """
        total = kernels.sum_of_squares(self.zero.grads(self._norm_ids)).double().reshape(1).cpu()
        if self.topology.tensor > 1:
            dist.all_reduce(total, group=self.groups.tensor_parallel_group)
        if self.topology.pipe > 1:
            dist.all_reduce(total, group=self.groups.pipe_parallel_group)
        if self.zero.sharded and self.topology.data > 1:
            dist.all_reduce(total, group=self.groups.data_parallel_group)
        return math.sqrt(total.item())
