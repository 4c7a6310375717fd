"""PipelineEngine: ``train_batch`` / ``eval_batch`` over point-to-point, executing schedules.

``initialize(module, config)`` joins torch.distributed (torchrun's environment or
pipegrid's local launcher), builds the groups, the optimizer and the schedules, and
returns the engine. The engine sets a rank up and runs its steps; what happens once per
step (tied and data-parallel gradient reduction, clipping, the optimizer) is its
``GradientUpdate``'s, what happens per instruction is the executor's.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels
from pipegrid.conf.schema import TrainConfig, to_train_config
from pipegrid.pipe import checkpoint as ckpt
from pipegrid.pipe import fp8, preemption
from pipegrid.pipe import trace as tracing
from pipegrid.pipe.compile import compile_stages
from pipegrid.pipe.executor import (
    Executor,
    PeerLostError,
    StepState,
    is_transport_failure,
)
from pipegrid.pipe.generate import GenerationReport, run_generation
from pipegrid.pipe.generate_request import check_request
from pipegrid.pipe.module_grid import (
    check_schedule_runs_module,
    config_with_module_grid,
)
from pipegrid.pipe.optimizer_build import build_optimizer, instantiate
from pipegrid.pipe.p2p import P2P
from pipegrid.pipe.precision import LossScaler
from pipegrid.pipe.preemption import SignalWatch
from pipegrid.pipe.sampling import Sampling
from pipegrid.pipe.update import GradientUpdate
from pipegrid.pipe.zero import OptimizerState, build_optimizer_state
from pipegrid.schedules import SCHEDULES, build, validate
from pipegrid.schedules import generate as generate_schedule
from pipegrid.tensor.linear_cross_entropy import LMLoss
from pipegrid.tensor.sequence import is_sequence_parallel
from pipegrid.topology.groups import ProcessGroups
from pipegrid.topology.join import header_group, init_distributed, local_cuda_device

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _check_before_collectives(module: torch.nn.Module, cfg: TrainConfig) -> None:
    """Refuse a bad module or (resolved) config on every rank before any process group exists."""
    build(cfg.schedule.name, cfg.topology.pipe, cfg.schedule.micro_batches,  # ScheduleError says what to change
          cfg.schedule.virtual_stages, coalesce=cfg.schedule.coalesce)
    _check_zero_layout(cfg)
    fp8.check_fp8(cfg)  # torchao, the GPU, the schedule: refused before any process group
    if module.loss_fn is None:
        raise ValueError("the PipelineModule has no loss_fn, which the last stage needs to train; "
                         "pass loss_fn=... (called as loss_fn(output, labels)) to PipelineModule")


def _check_zero_layout(cfg: TrainConfig) -> None:
    """ZeRO-3 needs data ranks to shard the parameters over; where a ZeRO setting merely saves
    nothing (one data rank, nothing offloaded) one line from rank 0 says so."""
    zero = cfg.zero
    if zero.stage == 3 and cfg.topology.data == 1:
        raise ValueError("zero.stage=3 shards the parameters over the data axis, but topology.data=1; set "
                         "topology.data > 1, or zero.stage=1 with zero.offload_optimizer=cpu to save memory "
                         "on one data rank")
    if zero.stage > 0 and cfg.topology.data == 1 and zero.offload_optimizer == "none" \
            and os.environ.get("RANK", "0") == "0":
        logging.getLogger("pipegrid").warning(
            f"zero.stage={zero.stage} with topology.data=1: one data rank holds every shard, so nothing is saved; "
            "set zero.stage=0, or topology.data > 1")


def initialize(module: torch.nn.Module, config: Any = None,
               groups: ProcessGroups | None = None) -> PipelineEngine:
    """Join torch.distributed if needed and return a PipelineEngine for ``module``.

    The grid (``topology``) and ``schedule.virtual_stages`` come from the module, and from
    ``groups`` when given, unless the config sets them; a config that sets another value
    is refused. A module that built its own groups (``hf.from_pretrained`` at tensor > 1)
    brings them as ``module.process_groups``: they are used when ``groups`` is not given.
    """
    if groups is None:
        groups = getattr(module, "process_groups", None)
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
        if config.precision.fp8:  # before anything holds the Linear modules or builds the optimizer
            fp8.convert_to_fp8(self.module, config.precision)
        if isinstance(getattr(module, "loss_fn", None), LMLoss):  # loss.chunked, unless the model has its own
            # per_layer frees the head's weight before a fused loss would read it: plain logits there
            per_layer = config.zero.stage == 3 and config.zero.gather == "per_layer"
            module.loss_fn.configure(dataclasses.replace(config.loss, chunked="false") if per_layer else config.loss)
        self.compiler = compile_stages(self.module, config.compile, SCHEDULES[config.schedule.name].split_backward,
                                       groups.rank)  # each layer in place; None unless compile.enabled
        self._build_schedules()
        self._connect()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.update = self._build_update()
        self.consumed_micro_batches = 0
        self.client_state: dict[str, Any] = {}  # JSON-able user state saved with checkpoints
        self.before_instruction: Callable[[Any], None] | None = None
        """Called with each instruction before it runs, when set: the seam for fault injection
        and debugging (an error it raises is the step's, with its own type and words)."""
        self._timeline: list[tuple[int, str, float, float]] = []
        self.generate_cache_bytes = 0
        """Bytes of KV cache this rank's stages held at the end of the last ``generate``."""
        self.generate_report: GenerationReport | None = None
        """What this rank's last ``generate`` ran and skipped (micro-batches that finished early)."""
        self.last_save: tuple[int, str] | None = None
        """(step, directory) of this engine's newest checkpoint."""
        self._arm_signal_handlers()

    # --- set-up ------------------------------------------------------------
    def _build_schedules(self) -> None:
        """The training schedule, the inference schedule on the same placement, their executors."""
        sched = self.config.schedule
        early = not self.config.comm.dynamic_shapes  # (a header-waiting receive posted early would block)
        self.schedule = build(sched.name, self.topology.pipe, sched.micro_batches, sched.virtual_stages,
                              coalesce=sched.coalesce, early_receives=early)
        self.eval_schedule = build("inference", self.topology.pipe, sched.micro_batches, sched.virtual_stages,
                                   coalesce=sched.coalesce, placement=self.schedule.placement.kind,
                                   early_receives=early)
        validate(self.schedule)
        validate(self.eval_schedule)

    def _connect(self) -> None:
        """The point-to-point layer (and, on NCCL, the group's first call on every rank), the executors."""
        self.kernels_backend = kernels.select_backend(self.config.kernels.backend, self.device)
        self.p2p = P2P(self.device, self.config.comm.dynamic_shapes, self.kernels_backend, rank=self.groups.rank,
                       header_group=header_group(self.config.comm.timeout_s))
        if self.device.type == "cuda":  # NCCL: a batch of transfers that is the group's first
            dist.barrier(device_ids=[self.device.index])  # call must include every rank
        self._train_executor = Executor(self.schedule, self.pipe_rank, self.module, self.p2p, self._pipe_peers,
                                        self.groups.rank)
        self._eval_executor = Executor(self.eval_schedule, self.pipe_rank, self.module, self.p2p,
                                       self._pipe_peers, self.groups.rank)

    def _build_update(self) -> GradientUpdate:
        """The optimizer state (replicated or ZeRO-sharded), loss scaler and LR schedule, and the
        once-per-step work over them."""
        optimizer_state = build_optimizer_state(
            self.config.zero.stage, self.params, lambda params: build_optimizer(self.config.optimizer, params),
            self.groups.data_parallel_group, self.topology.data, self.groups.coord.data, self.kernels_backend,
            reduce_every_micro_batch=self.config.zero.reduce_every_micro_batch,
            tied=self._tied_across_pipe_ranks(), offload=self._offloads(), gather=self.config.zero.gather,
            chunks=[self.module.stage_module(s) for s in self.module.stage_ids],
            bucket_elements=self.config.zero.bucket_elements)
        scheduler = (instantiate(self.config.lr_scheduler, optimizer_state.optimizer)
                     if self.config.lr_scheduler else None)
        prec = self.config.precision
        scaler = LossScaler(prec.dtype == "float16", prec.initial_loss_scale, prec.growth_interval,
                            prec.backoff_factor, prec.hysteresis, prec.min_loss_scale)
        return GradientUpdate(self.module, self.config, self.groups, optimizer_state, scaler, scheduler,
                              self.device, self.dtype, self.schedule.loss_rank, self.kernels_backend)

    def _offloads(self) -> bool:
        """``zero.offload_optimizer=cpu`` on an accelerator; on a CPU-only run it changes nothing (one notice)."""
        if self.config.zero.offload_optimizer != "cpu":
            return False
        if self.device.type == "cpu":
            if self.groups.rank == 0:
                logging.getLogger("pipegrid").warning(
                    "zero.offload_optimizer=cpu: this run trains on the CPU, where the optimizer state "
                    "already is; nothing is offloaded")
            return False
        return True

    def _tied_across_pipe_ranks(self) -> frozenset[int]:
        """Ids of local parameters a tied layer shares with another pipe rank, and sequence-parallel ones
        (summed over their tensor group): both are summed at ReduceTiedGrads, so ZeRO keeps them whole."""
        tied = frozenset(id(p) for key, owners in self.module.tied_pipe_ranks().items() if len(owners) > 1
                         for p in self.module.tied_parameters(key))
        return tied | {id(p) for p in self.params if is_sequence_parallel(p)}

    def _arm_signal_handlers(self) -> None:
        self._stop = SignalWatch(self.config.train.save_on_signal, saves=bool(self.config.checkpoint.dir),
                                 rank=self.groups.rank)
        self._stop.arm()
        weakref.finalize(self, self._stop.disarm)  # (the handlers hold the watch, never the engine)

    # what the step's update owns, as the engine's users (checkpoints, compat, tests) read it
    @property
    def zero(self) -> OptimizerState:
        """The optimizer state: replicated (``zero.stage=0``) or sharded over the data axis."""
        return self.update.zero

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer (param_groups, learning rate)."""
        return self.update.zero.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self.update.lr_scheduler

    @lr_scheduler.setter
    def lr_scheduler(self, scheduler: Any) -> None:  # a DeepSpeed script's client scheduler
        self.update.lr_scheduler = scheduler

    @property
    def scaler(self) -> LossScaler:
        return self.update.scaler

    @scaler.setter
    def scaler(self, scaler: LossScaler) -> None:  # the DeepSpeed drop-in brings its own
        self.update.scaler = scaler

    @property
    def global_steps(self) -> int:
        return self.update.global_steps

    @global_steps.setter
    def global_steps(self, value: int) -> None:
        self.update.global_steps = value

    @property
    def skipped_steps(self) -> int:
        return self.update.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.update.skipped_steps = value

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

    def stage_rank(self, stage: int) -> int:
        """Global rank running model stage ``stage`` on this rank's data/tensor coordinate."""
        return self._pipe_peers[self.schedule.rank_of(stage)]

    # --- the step ----------------------------------------------------------
    def train_batch(self, data_iter: Iterable | None = None) -> float:
        """One optimizer step over ``schedule.micro_batches`` micro-batches; the global mean loss."""
        self.module.train()
        state = self._run(self._train_executor, StepState(True, self._iterator(data_iter)))
        self.global_steps += 1
        self.consumed_micro_batches += self.schedule.micro_batches
        loss = self.update.mean_loss(state.loss)
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
        state = self._run(self._eval_executor, StepState(False, self._iterator(data_iter), return_outputs))
        loss = self.update.mean_loss(state.loss)
        if not return_outputs:
            return loss
        outputs = [state.results[mb] for mb in sorted(state.results)] if state.results else None
        return loss, outputs

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None,
                 micro_batches: int | None = None) -> torch.Tensor:
        """Prompts (left padded) -> prompts + new tokens, on every rank (as transformers' ``generate``
        returns ``sequences``). Each stage keeps its own layers' KV cache; the batch is split into
        ``micro_batches`` (default: the schedule's, at most the batch) in flight at once; a sampled
        sequence draws from its own generator seeded ``seed + row``. See docs/generate.md."""
        request = check_request(
            self.module, pipe=self.topology.pipe, tensor=self.topology.tensor, input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens, sampling=Sampling(do_sample, temperature, top_k, top_p),
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, micro_batches=micro_batches,
            default_micro_batches=max(self.config.schedule.micro_batches, self.topology.pipe))
        schedule = generate_schedule.build(self.topology.pipe, request.micro_batches, request.max_new_tokens,
                                           self.schedule.virtual_stages, self.schedule.placement.kind)
        self.module.eval()
        sequences, self.generate_report = run_generation(
            schedule, self.pipe_rank, self.module, self.p2p.with_dynamic_shapes(), self._pipe_peers, request,
            self.device, self.groups.pipe_parallel_group)
        self.generate_cache_bytes = self.generate_report.cache_bytes
        return sequences

    def _iterator(self, data_iter: Iterable | None) -> Iterator | None:
        if data_iter is None or isinstance(data_iter, Iterator):
            return data_iter
        return iter(data_iter)

    def _run(self, executor: Executor, state: StepState) -> StepState:
        trace = self.config.trace.enabled
        # A failure leaves this step's sends pending, unwaited: their peer may be the one
        # lost, and waiting would put the transport's error (or a hang) in place of the cause.
        self.zero.begin_step()  # (ZeRO-3: the whole parameters until the optimizer step frees them, or per layer)
        executor.run(state, self.update, trace=trace, before=self.before_instruction)
        try:
            self.p2p.wait_all()
        except (dist.DistError, RuntimeError) as error:
            if not is_transport_failure(error):
                raise
            raise PeerLostError(executor.lost_while_draining(error)) from error
        if trace:
            self._timeline = [(self.groups.rank, label, start, end) for label, start, end in state.events]
        return state

    def save_checkpoint(self, directory: str | None = None) -> str:
        """Collective: write checkpoint ``step_<global_steps>`` under ``directory`` and point ``latest`` at it."""
        self.zero.gather_params()
        path = ckpt.save_engine(self, directory or self._checkpoint_dir())
        self.last_save = (self.global_steps, path)
        return path

    def load_checkpoint(self, directory: str | None = None, load_optimizer_states: bool = True) -> int | None:
        """Load the newest whole checkpoint (any pipe/data degree for the model); its step or None."""
        self.zero.gather_params()
        loaded = ckpt.load_engine(self, directory or self._checkpoint_dir(), load_optimizer_states)
        if loaded is None:
            return None
        step, progress = loaded
        self.global_steps, self.skipped_steps = progress.global_steps, progress.skipped_steps
        self.consumed_micro_batches, self.client_state = progress.consumed_micro_batches, progress.client_state
        return step

    def progress(self) -> ckpt.TrainingProgress:
        """Where training is: what a checkpoint records beside the weights and optimizer state."""
        return ckpt.TrainingProgress(self.global_steps, self.skipped_steps, self.consumed_micro_batches,
                                     self.client_state)

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

    def gather_parameters(self) -> None:
        """Collective over data: the whole parameters back in ``self.module`` (ZeRO-3 frees them after
        each optimizer step; the next step, save or load gathers them itself) until the next step."""
        self.zero.gather_params()

    def global_grad_norm(self) -> float:
        """Collective: L2 norm of the whole model's (scaled) gradient over the grid."""
        return self.update.global_grad_norm()

    def memory_report(self) -> dict[str, int]:
        """Bytes of the storages this rank's training state allocates: parameters, gradients,
        optimizer state, fp32 master weights, engine buffers; each storage counted once (a
        flat buffer whole, padding included). Gradients that live only within a step are
        those of the last step that created optimizer state (before any step: none)."""
        report = self.zero.memory()
        report["total"] = sum(report.values())
        return report
