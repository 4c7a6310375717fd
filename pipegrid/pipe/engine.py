"""PipelineEngine: ``train_batch`` / ``eval_batch`` over point-to-point, executing schedules.

``initialize(module, config)`` joins torch.distributed (torchrun's environment or
pipegrid's local launcher), builds the groups, the optimizer and the schedules, and
returns the engine. The engine owns what happens once per step (tied and
data-parallel gradient reduction, clipping, the optimizer); the executor owns what
happens per instruction.
"""

from __future__ import annotations

import importlib
import inspect
import math
import signal
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels
from pipegrid.conf.schema import TrainConfig, to_train_config
from pipegrid.pipe import checkpoint as ckpt
from pipegrid.pipe import trace as tracing
from pipegrid.pipe.executor import Executor, PeerLostError, StepState, is_transport_failure
from pipegrid.pipe.p2p import P2P
from pipegrid.pipe import preemption
from pipegrid.pipe.module_grid import check_schedule_runs_module, config_with_module_grid
from pipegrid.pipe.preemption import SignalWatch
from pipegrid.pipe.precision import LossScaler
from pipegrid.pipe.zero import ReplicatedOptimizer, ZeroOptimizer, all_reduce_flat
from pipegrid.schedules import build, validate
from pipegrid.tensor import is_tensor_sharded
from pipegrid.topology.groups import ProcessGroups
from pipegrid.topology.join import header_group, init_distributed, local_cuda_device

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def locate(path: str) -> Any:
    """The object at a dotted path, e.g. ``torch.optim.AdamW`` (Hydra's ``_target_``)."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import _target_ {path!r} ({error}); give a dotted path such as "
                         "torch.optim.AdamW") from None


def instantiate(spec: dict[str, Any], *args: Any) -> Any:
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    return locate(spec["_target_"])(*args, **kwargs)


def build_optimizer(spec: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``spec``'s optimizer, with torch's fused kernel when the config leaves the choice open.

    A fused Adam step is one kernel per parameter instead of ~10 (on CPU 0.2 vs 0.55 ms
    for 4 MLP blocks of width 64, 9 vs 44 ms at width 512); DeepSpeed users get a fused
    Adam by default too. ``optimizer.fused=false`` (or any ``foreach``) keeps torch's own
    choice; an optimizer, device or dtype without a fused kernel falls back to it.
    """
    cls = locate(spec["_target_"])
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    if "fused" in kwargs or "foreach" in kwargs or "fused" not in inspect.signature(cls).parameters:
        return cls(params, **kwargs)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
        return cls(params, **kwargs)


def _check_before_collectives(module: torch.nn.Module, cfg: TrainConfig) -> None:
    """Refuse a bad module or (resolved) config on every rank before any process group exists."""
    build(cfg.schedule.name, cfg.topology.pipe, cfg.schedule.micro_batches,  # ScheduleError says what to change
          cfg.schedule.virtual_stages, coalesce=cfg.schedule.coalesce)
    if module.loss_fn is None:
        raise ValueError("the PipelineModule has no loss_fn, which the last stage needs to train; "
                         "pass loss_fn=... (called as loss_fn(output, labels)) to PipelineModule")


def initialize(module: torch.nn.Module, config: Any = None,
               groups: ProcessGroups | None = None) -> "PipelineEngine":
    """Join torch.distributed if needed and return a PipelineEngine for ``module``.

    The grid (``topology``) and ``schedule.virtual_stages`` come from the module, and from
    ``groups`` when given, unless the config sets them; a config that sets another value
    is refused.
    """
    cfg = config_with_module_grid(to_train_config(config), module, groups)
    _check_before_collectives(module, cfg)
    if groups is None:
        groups = init_distributed(cfg)
    engine = PipelineEngine(module, cfg, groups)
    if cfg.checkpoint.dir:  # a run started on an existing checkpoint directory resumes from it
        ckpt.check_writable(cfg.checkpoint.dir)
        engine.load_checkpoint(cfg.checkpoint.dir)
    return engine


class PipelineEngine:
    """Trains one PipelineModule stage (or its virtual chunks) on one rank of the grid."""

    def __init__(self, module: torch.nn.Module, config: TrainConfig, groups: ProcessGroups) -> None:
        self.config, self.groups, self.topology = config, groups, groups.topology
        self.pipe_rank = groups.pipe_rank
        self._pipe_peers = [groups.pipe_peer(r) for r in range(groups.topology.pipe)]  # asked per message
        self._check_module(module)
        self.device = self._device()
        self.dtype = _DTYPES[config.precision.dtype]
        self.module = module.to(device=self.device, dtype=self.dtype)
        sched = config.schedule
        self.schedule = build(sched.name, self.topology.pipe, sched.micro_batches, sched.virtual_stages,
                              coalesce=sched.coalesce)
        self.eval_schedule = build("inference", self.topology.pipe, sched.micro_batches, sched.virtual_stages,
                                   coalesce=sched.coalesce, placement=self.schedule.placement.kind)
        validate(self.schedule)
        validate(self.eval_schedule)
        self.kernels_backend = kernels.select_backend(config.kernels.backend, self.device)
        self.p2p = P2P(self.device, config.comm.dynamic_shapes, self.kernels_backend, rank=groups.rank,
                       header_group=header_group(config.comm.timeout_s))
        if self.device.type == "cuda":  # NCCL: a batch of transfers that is the group's first
            dist.barrier(device_ids=[self.device.index])  # call must include every rank
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.zero = self._build_optimizer()
        self.optimizer = self.zero.optimizer  # the wrapped torch optimizer (param_groups, LR)
        self.lr_scheduler = instantiate(config.lr_scheduler, self.optimizer) if config.lr_scheduler else None
        prec = config.precision
        self.scaler = LossScaler(prec.dtype == "float16", prec.initial_loss_scale, prec.growth_interval,
                                 prec.backoff_factor, prec.hysteresis, prec.min_loss_scale)
        self.skipped_steps = 0
        self._tied_groups = self._build_tied_groups()
        self._norm_ids = {id(p) for p in self._params_counted_in_norm()}
        self.global_steps = 0
        self.consumed_micro_batches = 0
        self.client_state: dict[str, Any] = {}  # JSON-able user state saved with checkpoints
        self._timeline: list[tuple[int, str, float, float]] = []
        self._train_executor, self._eval_executor = (
            Executor(schedule, self.pipe_rank, self.module, self.p2p, self._pipe_peers, groups.rank)
            for schedule in (self.schedule, self.eval_schedule))
        self.last_save: tuple[int, str] | None = None
        """(step, directory) of this engine's newest checkpoint."""
        self._stop = SignalWatch(config.train.save_on_signal, saves=bool(config.checkpoint.dir), rank=groups.rank)
        self._stop.arm()
        weakref.finalize(self, self._stop.disarm)  # (the handlers hold the watch, never the engine)

    # --- set-up ------------------------------------------------------------
    def _check_module(self, module: torch.nn.Module) -> None:
        """What only the joined rank can check (initialize() checked the rest before any group)."""
        if (module.pipe, module.virtual_stages) != (self.topology.pipe, self.config.schedule.virtual_stages):
            raise ValueError(f"the module was cut into pipe={module.pipe} x virtual_stages="
                             f"{module.virtual_stages} but the engine runs pipe={self.topology.pipe} x "
                             f"virtual_stages={self.config.schedule.virtual_stages}; use pipegrid.initialize(), "
                             "which takes the layout from the module")
        check_schedule_runs_module(self.config.schedule.name, module)
        if module.pipe_rank != self.pipe_rank:
            raise ValueError(f"rank {self.groups.rank} is pipe rank {self.pipe_rank} but its module holds "
                             f"pipe rank {module.pipe_rank}; build the module after torch.distributed is "
                             "initialised, or pass topology= so it finds its pipe rank from RANK")

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            device = local_cuda_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _build_optimizer(self) -> ReplicatedOptimizer | ZeroOptimizer:
        def factory(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return build_optimizer(self.config.optimizer, params)
        group, size = self.groups.data_parallel_group, self.topology.data
        if self.config.zero.stage == 1:
            return ZeroOptimizer(self.params, factory, group, size, self.groups.coord.data, self.kernels_backend)
        return ReplicatedOptimizer(self.params, factory, group, size, self.kernels_backend)

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
        skip: set[int] = set()
        for key, owners in self.module.tied_pipe_ranks().items():
            if owners[0] != self.pipe_rank:
                skip.update(id(p) for p in self.module.tied_parameters(key))
        if self.groups.coord.tensor != 0:  # replicated over the tensor group: counted on tensor rank 0 only
            skip.update(id(p) for p in self.params if not is_tensor_sharded(p))
        return [p for p in self.params if id(p) not in skip]

    def collective_peers(self, op: Any) -> list[int]:
        """Ranks a once-per-step instruction talks to (to name them when one is lost)."""
        name = type(op).__name__
        if name == "ReduceGrads":
            return self.groups.axis_ranks["data"]
        if name == "ReduceTiedGrads":
            return self.groups.axis_ranks["pipe"]
        return list(range(self.topology.world_size))  # the step's loss and flags: every rank

    def stage_rank(self, stage: int) -> int:
        """Global rank running model stage ``stage`` on this rank's data/tensor coordinate."""
        return self._pipe_peers[self.schedule.rank_of(stage)]

    def to_device(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.to(self.device, non_blocking=True)
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_device(v) for v in value)
        return value

    # --- the step ----------------------------------------------------------
    def train_batch(self, data_iter: Iterable | None = None) -> float:
        """One optimizer step over ``schedule.micro_batches`` micro-batches; the global mean loss."""
        self.module.train()
        state = self._run(self._train_executor, StepState(True, self._iterator(data_iter), self))
        self.global_steps += 1
        self.consumed_micro_batches += self.schedule.micro_batches
        loss = self._mean_loss(state)
        every, directory = self.config.checkpoint.interval, self.config.checkpoint.dir
        if directory and every > 0 and self.global_steps % every == 0:
            self.save_checkpoint(directory)
        if self._stop.armed and self._stop.saves:
            preemption.stop_if_signalled(self, self._stop, loss)  # collective; may raise Preempted
        return loss

    @property
    def stop_requested(self) -> str | None:
        """The stop signal this rank noted (e.g. "SIGTERM"), which the ranks agree on at the end
        of the step in flight; None when none (see ``train.save_on_signal``)."""
        return signal.Signals(self._stop.received).name if self._stop.received else None

    @torch.no_grad()
    def eval_batch(self, data_iter: Iterable | None = None, return_outputs: bool = False) -> Any:
        """Forward-only mean loss (and, on the last stage, every micro-batch's outputs if asked)."""
        self.module.eval()
        state = self._run(self._eval_executor, StepState(False, self._iterator(data_iter), self, return_outputs))
        loss = self._mean_loss(state)
        if not return_outputs:
            return loss
        outputs = [state.results[mb] for mb in sorted(state.results)] if state.results else None
        return loss, outputs

    def _iterator(self, data_iter: Iterable | None) -> Iterator | None:
        if data_iter is None or isinstance(data_iter, Iterator):
            return data_iter
        return iter(data_iter)

    def _run(self, executor: Executor, state: StepState) -> StepState:
        trace = self.config.trace.enabled
        # A failure leaves this step's sends pending, unwaited: their peer may be the one
        # lost, and waiting would put the transport's error (or a hang) in place of the cause.
        executor.run(state, trace=trace)
        try:
            self.p2p.wait_all()
        except (dist.DistError, RuntimeError) as error:
            if not is_transport_failure(error):
                raise
            raise PeerLostError(executor.lost_while_draining(error)) from error
        if trace:
            self._timeline = [(self.groups.rank, label, start, end) for label, start, end in state.events]
        return state

    def _mean_loss(self, state: StepState) -> float:
        """The mean micro-batch loss over the global batch, on every rank."""
        if state.step_loss is not None:  # OptimizerStep already reduced it
            return state.step_loss
        loss, _, _ = self._check_finite(state.losses, grads=False)
        return loss

    def save_checkpoint(self, directory: str | None = None) -> str:
        """Collective: write checkpoint ``step_<global_steps>`` under ``directory`` and point ``latest`` at it."""
        path = ckpt.save_engine(self, directory or self._checkpoint_dir())
        self.last_save = (self.global_steps, path)
        return path

    def load_checkpoint(self, directory: str | None = None, load_optimizer_states: bool = True) -> int | None:
        """Load the newest whole checkpoint (any pipe/data degree for the model); its step or None."""
        return ckpt.load_engine(self, directory or self._checkpoint_dir(), load_optimizer_states)

    def _checkpoint_dir(self) -> str:
        if not self.config.checkpoint.dir:
            raise ValueError("no checkpoint directory: pass one, or set checkpoint.dir in the config")
        return self.config.checkpoint.dir

    def write_trace(self, path: str | None = None) -> dict[str, float] | None:
        """Collective: merge every rank's last traced step into a Chrome trace (+ PNG) on rank 0."""
        target = path or self.config.trace.path or "pipegrid_trace.json"
        return tracing.write_trace(self, target)

    def last_timeline(self) -> list[tuple[int, str, float, float]]:
        """(rank, instruction, start, end) of the last traced step on this rank (``trace.enabled``)."""
        return list(self._timeline)

    # --- hooks the executor calls --------------------------------------------
    def scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from: multiplied by the fp16 loss scale when scaling."""
        return loss * self.scaler.scale if self.scaler.enabled else loss

    def reduce_tied_grads(self) -> None:
        for key, group in sorted(self._tied_groups.items()):
            grads = [self.zero.grad_of(p) for p in self.module.tied_parameters(key)]  # fp32 in 16-bit
            all_reduce_flat(grads, group, backend=self.kernels_backend)

    def reduce_data_parallel_grads(self) -> None:
        self.zero.reduce_grads()

    def global_grad_norm(self) -> float:
        """L2 norm of the whole model's (scaled) gradient: each parameter once, over tensor, pipe and data shards.

        Tensor-parallel shards (:func:`~pipegrid.tensor.is_tensor_sharded`) count on every tensor
        rank, replicated parameters on tensor rank 0 only; a tied copy on its first owner.
        """
        total = kernels.sum_of_squares(self.zero.grads(self._norm_ids)).double().reshape(1).cpu()
        if self.topology.tensor > 1:
            dist.all_reduce(total, group=self.groups.tensor_parallel_group)
        if self.topology.pipe > 1:
            dist.all_reduce(total, group=self.groups.pipe_parallel_group)
        if self.zero.sharded and self.topology.data > 1:
            dist.all_reduce(total, group=self.groups.data_parallel_group)
        return math.sqrt(total.item())

    def _check_finite(self, losses: dict[int, torch.Tensor], grads: bool = True) -> tuple[float, bool, bool]:
        """One world all-reduce: the step's mean loss, any non-finite loss, any non-finite gradient."""
        owner = self.pipe_rank == self.schedule.loss_rank and self.groups.coord.tensor == 0
        values = torch.zeros(3, dtype=torch.float64)
        if owner and losses:
            stacked = torch.stack([v.double().cpu() for v in losses.values()])
            values[0] = stacked.sum() / len(losses)
            values[1] = float(not bool(torch.isfinite(stacked).all()))
        if grads and self.scaler.enabled:
            values[2] = float(not bool(kernels.all_finite(self.zero.grads())))
        if dist.get_world_size() > 1:
            dist.all_reduce(values)
        if values[1] > 0:
            values[0] = math.nan
        return values[0].item() / self.topology.data, bool(values[1] > 0), bool(values[2] > 0)

    def _data_mean(self, loss_stats: torch.Tensor) -> tuple[float, bool, bool]:
        """The loss statistics this replica's last stage sent down, averaged over the data axis."""
        values = loss_stats.clone()
        if self.topology.data > 1:
            dist.all_reduce(values, group=self.groups.data_parallel_group)
        bad = bool(values[1] > 0)
        return (math.nan if bad else values[0].item() / self.topology.data), bad, False

    def optimizer_step(self, losses: dict[int, torch.Tensor], loss_stats: torch.Tensor | None = None) -> float:
        """Clip and apply the step's gradients (or skip the step on a non-finite loss); the step's mean loss."""
        if loss_stats is not None and not self.scaler.enabled:
            mean_loss, bad_loss, overflow = self._data_mean(loss_stats)
        else:  # fp16 needs every rank's overflow flag: one world all-reduce
            mean_loss, bad_loss, overflow = self._check_finite(losses)
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

    def memory_report(self) -> dict[str, int]:
        """Bytes of the storages this rank's training state allocates: parameters, gradients,
        optimizer state, fp32 master weights, engine buffers; each storage counted once (a
        flat buffer whole, padding included). Gradients that live only within a step are
        those of the last step that created optimizer state (before any step: none)."""
        report = self.zero.memory()
        report["total"] = sum(report.values())
        return report
