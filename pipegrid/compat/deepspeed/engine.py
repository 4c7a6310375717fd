"""DeepSpeed's PipelineEngine surface (train_batch, eval_batch, checkpoints, get_lr...) over a
pipegrid PipelineEngine: it translates arguments and results and delegates every step.

Differences a script can see: ``train_batch`` returns the mean loss as a float32 tensor (as
DeepSpeed); checkpoints are pipegrid's (``save_dir/<tag>/`` plus DeepSpeed's ``latest`` file
naming the tag), and ``client_state`` must be JSON-able. Attributes not defined here
(``memory_report``, ``write_trace``...) are the pipegrid engine's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.compat.deepspeed.from_config import DeepSpeedTranslation
from pipegrid.pipe.checkpoint import atomic_write_text
from pipegrid.pipe.engine import PipelineEngine as Engine

__all__ = ["PipelineEngine"]

_log = logging.getLogger("pipegrid.compat.deepspeed")
LATEST = "latest"
_OFFSET_KEY = "__pipegrid_micro_offset__"  # seed_layers' dropout stream position, kept in client_state
_PHASES = (("forward", ("F",)), ("backward", ("B", "I", "W")), ("send", ("SA", "SG")), ("recv", ("RA", "RG")),
           ("reduce", ("TIED", "REDUCE")), ("step", ("STEP",)))


class PipelineEngine:
    """What ``deepspeed.initialize`` returns for a PipelineModule, running on pipegrid."""

    def __init__(self, engine: Engine, translation: DeepSpeedTranslation,
                 training_dataloader: Iterable | None = None) -> None:
        self.engine, self.translation = engine, translation
        self.training_dataloader = training_dataloader if self._reads_data() else None
        self.data_iterator: Iterator | None = iter(self.training_dataloader) if self.training_dataloader else None
        self.batch_fn: Callable[[Any], Any] | None = None
        self._steps_time = 0.0

    def __getattr__(self, name: str) -> Any:
        # only called for names not found here: the pipegrid engine's (memory_report, write_trace...)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    # --- identity ------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.engine.optimizer if self.translation.has_optimizer else None

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    @property
    def global_samples(self) -> int:
        return self.engine.global_steps * self.translation.train_batch_size

    @property
    def stage_id(self) -> int:
        return self.engine.pipe_rank

    @property
    def num_stages(self) -> int:
        return self.engine.topology.pipe

    @property
    def micro_batches(self) -> int:
        return self.translation.gradient_accumulation_steps

    @property
    def micro_batch_size(self) -> int:
        return self.translation.micro_batch_size

    @property
    def global_rank(self) -> int:
        return self.engine.groups.rank

    @property
    def dp_world_size(self) -> int:
        return self.engine.topology.data

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    def is_first_stage(self) -> bool:
        return self.engine.pipe_rank == 0

    def is_last_stage(self) -> bool:
        return self.engine.pipe_rank == self.engine.topology.pipe - 1

    def train_batch_size(self) -> int:
        return self.translation.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.translation.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.translation.gradient_accumulation_steps

    def steps_per_print(self) -> int | None:
        return self.translation.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.translation.wall_clock_breakdown

    def gradient_clipping(self) -> float:
        return self.engine.config.train.grad_clip

    def zero_optimization_stage(self) -> int:
        return self.engine.config.zero.stage

    def fp16_enabled(self) -> bool:
        return self.engine.config.precision.dtype == "float16"

    def bfloat16_enabled(self) -> bool:
        return self.engine.config.precision.dtype == "bfloat16"

    def get_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.engine.optimizer.param_groups]

    def get_mom(self) -> list[Any]:
        return [group["betas"] if "betas" in group else group.get("momentum")
                for group in self.engine.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        return True  # the engine reduces and steps inside train_batch, never between calls

    # --- data ----------------------------------------------------------------------
    def _reads_data(self) -> bool:
        return self.is_first_stage() or self.is_last_stage()

    def set_dataloader(self, loader: Iterable) -> None:
        """Train from ``loader`` (first and last stages read it; the others read nothing)."""
        if self._reads_data():
            self.training_dataloader, self.data_iterator = loader, iter(loader)

    def set_dataiterator(self, iterator: Iterator) -> None:
        """Train from ``iterator`` from now on (what ``train_batch(data_iter)`` does)."""
        if self._reads_data():
            self.training_dataloader, self.data_iterator = None, iterator

    def set_batch_fn(self, fn: Callable[[Any], Any]) -> None:
        """Apply ``fn`` to every batch read (DeepSpeed's post-processing hook)."""
        self.batch_fn = fn

    def _batches(self, iterator: Iterator | None, what: str) -> Iterator | None:
        if not self._reads_data():
            return None
        if iterator is None:
            raise RuntimeError(f"{what} on pipe stage {self.stage_id} has no data: pass data_iter=..., or "
                               "training_data=... to deepspeed.initialize()")
        iterator = iter(iterator)
        return map(self.batch_fn, iterator) if self.batch_fn else iterator

    # --- the step ------------------------------------------------------------------
    def train_batch(self, data_iter: Iterator | None = None) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; their mean loss (all ranks)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        if not self.translation.has_optimizer:
            raise RuntimeError("no optimizer: the DeepSpeed config has no \"optimizer\" section and none was "
                               "passed to deepspeed.initialize(); add one to train")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        start = time.perf_counter()
        loss = self.engine.train_batch(self._batches(self.data_iterator, "train_batch()"))
        self._steps_time += time.perf_counter() - start
        self._report(loss)
        return torch.tensor(loss, dtype=torch.float32, device=self.engine.device)

    def eval_batch(self, data_iter: Iterator, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward-only mean loss over gradient_accumulation_steps micro-batches; with ``return_logits``
        also the last micro-batch's outputs on the last stage (None elsewhere), as DeepSpeed."""
        if not compute_loss or reduce_output != "avg":
            raise ValueError("eval_batch supports compute_loss=True with reduce_output='avg' (the mean loss); got "
                             f"compute_loss={compute_loss}, reduce_output={reduce_output!r}")
        if num_micro_batches not in (None, self.micro_batches):
            raise ValueError(f"eval_batch runs gradient_accumulation_steps={self.micro_batches} micro-batches, got "
                             f"num_micro_batches={num_micro_batches}; pass None")
        batches = self._batches(data_iter, "eval_batch()")
        if not return_logits:
            return torch.tensor(self.engine.eval_batch(batches), dtype=torch.float32, device=self.engine.device)
        loss, outputs = self.engine.eval_batch(batches, return_outputs=True)
        return torch.tensor(loss, dtype=torch.float32, device=self.engine.device), (outputs[-1] if outputs else None)

    def _report(self, loss: float) -> None:
        """DeepSpeed's progress lines every steps_per_print steps, on rank 0."""
        every, step = self.translation.steps_per_print, self.engine.global_steps
        if every is None or step % every or self.global_rank != 0:
            return
        iter_time, self._steps_time = self._steps_time / every, 0.0
        _log.info("step=%d, skipped=%d, lr=%s, mom=%s", step, self.engine.skipped_steps, self.get_lr(),
                  self.get_mom())
        print(f"steps: {step} loss: {loss:0.4f} iter time (s): {iter_time:0.3f} "
              f"samples/sec: {self.train_batch_size() / iter_time:0.3f}", flush=True)
        if self.translation.wall_clock_breakdown:
            print(_breakdown(self.engine.last_timeline()), flush=True)
        if self.translation.memory_breakdown:
            print("memory (MiB) | " + " | ".join(f"{k}: {v / 2 ** 20:.2f}"
                                                 for k, v in self.engine.memory_report().items()), flush=True)

    # --- pipeline-only ---------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Only train_batch() is accessible in pipeline mode (DeepSpeed's rule too).")

    __call__ = forward
    backward = forward
    step = forward

    def train(self, mode: bool = True) -> None:
        self.engine.module.train(mode)

    def eval(self) -> None:
        self.engine.module.eval()

    # --- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Collective: pipegrid's checkpoint in ``save_dir/<tag>`` (default ``global_step<N>``), and
        ``save_dir/latest`` naming the tag. ``client_state`` comes back from load_checkpoint."""
        if exclude_frozen_parameters:
            raise ValueError("exclude_frozen_parameters=True is not supported; pipegrid saves every layer")
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        state = dict(client_state or {})
        try:
            json.dumps(state)
        except (TypeError, ValueError) as error:
            raise TypeError(f"client_state must be JSON-able (pipegrid checkpoints load with weights_only=True): "
                            f"{error}; store numbers, strings, lists and dicts") from None
        # seed_layers reseeds dropout from a count of forward calls: save it, so a resumed run draws the
        # masks an uninterrupted one would (DeepSpeed restarts the count)
        self.engine.client_state = {**state, _OFFSET_KEY: getattr(self.engine.module, "micro_offset", 0)}
        self.engine.save_checkpoint(os.path.join(save_dir, tag))
        if save_latest and self.global_rank == 0:
            atomic_write_text(os.path.join(save_dir, LATEST), tag)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return True

    def load_checkpoint(self, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Callable | None = None
                        ) -> tuple[str | None, dict | None]:
        """Load ``load_dir/<tag>`` (default: the tag in ``load_dir/latest``); (its path, client_state),
        or (None, None) when there is none, as DeepSpeed."""
        if not load_module_strict or custom_load_fn is not None or not load_lr_scheduler_states:
            raise ValueError("load_checkpoint supports strict loads of the whole state: load_module_strict=False, "
                             "custom_load_fn and load_lr_scheduler_states=False are not supported")
        if tag is None:
            latest = os.path.join(load_dir, LATEST)
            if not os.path.isfile(latest):
                _log.warning("Unable to find latest file at %s, if trying to load latest checkpoint please ensure "
                             "this file exists or pass an explicit checkpoint tag when loading a checkpoint.", latest)
                return None, None
            with open(latest) as f:
                tag = f.read().strip()
        path = os.path.join(load_dir, str(tag))
        step = self.engine.load_checkpoint(path, load_optimizer_states=load_optimizer_states and not load_module_only)
        if step is None:
            return None, None
        client_state = dict(self.engine.client_state)
        if hasattr(self.engine.module, "micro_offset"):
            self.engine.module.micro_offset = int(client_state.get(_OFFSET_KEY, 0))
        client_state.pop(_OFFSET_KEY, None)
        return path, client_state


def _breakdown(timeline: list[tuple[int, str, float, float]]) -> str:
    """DeepSpeed-style wall-clock breakdown of the last step: milliseconds per kind of instruction."""
    totals = {name: 0.0 for name, _ in _PHASES}
    for _, label, start, end in timeline:
        code = "".join(c for c in label.split("+")[0] if c.isalpha())
        for name, codes in _PHASES:
            if code in codes:
                totals[name] += (end - start) * 1e3
    return "time (ms) | " + " | ".join(f"{name}: {ms:.2f}" for name, ms in totals.items())
