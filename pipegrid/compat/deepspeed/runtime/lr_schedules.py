"""DeepSpeed's LR schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest) as torch
LR schedulers, with DeepSpeed 0.19's formulas and defaults, so pipegrid's engine steps them.

DeepSpeed counts ``last_batch_iteration`` from -1 (the value set at construction, before any
optimizer step); torch counts ``last_epoch`` from 0 after its construction step, so here
``last_batch_iteration = last_epoch - 1`` and every rate is a pure function of it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR"]

_log = logging.getLogger(__name__)
LOG, LINEAR = "log", "linear"


def _torch_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer, or the one a wrapper holds in ``.optimizer`` (as DeepSpeed unwraps)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer (nor wraps one in .optimizer)")


def _per_group(optimizer: Optimizer, value: float | Sequence[float], name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"expected {len(optimizer.param_groups)} values for {name} (one per param group), "
                             f"got {len(value)}")
        return list(value)
    return [value] * len(optimizer.param_groups)


def _check_steps(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _warmup_type(warmup_type: str) -> str:
    if warmup_type not in (LOG, LINEAR):
        _log.warning("Using unknown warmup_type: %s. The increasing function is set to default (log)", warmup_type)
        return LOG
    return warmup_type


def _fresh_start(last_batch_iteration: int) -> None:
    if last_batch_iteration != -1:
        raise ValueError(f"last_batch_iteration={last_batch_iteration}: pipegrid restores a schedule's position "
                         "from checkpoints (engine.load_checkpoint); construct it with the default -1")


class _DeepSpeedSchedule(LRScheduler):
    """Base: ``get_lr`` is DeepSpeed's rate at ``last_batch_iteration``."""

    @property
    def last_batch_iteration(self) -> int:
        return self.last_epoch - 1

    def _rates(self, iteration: int) -> list[float]:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return self._rates(self.last_batch_iteration)

    def _get_closed_form_lr(self) -> list[float]:
        return self._rates(self.last_batch_iteration)

    def step(self, last_batch_iteration: int | None = None) -> None:  # type: ignore[override]
        """Advance one batch, or jump to ``last_batch_iteration`` (DeepSpeed's argument)."""
        if last_batch_iteration is not None:
            self.last_epoch = last_batch_iteration  # step() adds one: iteration = last_epoch - 1
        super().step()


class WarmupLR(_DeepSpeedSchedule):
    """From ``warmup_min_lr`` to ``warmup_max_lr`` (default: the optimizer's lr) over ``warmup_num_steps``
    (at least 2), log-shaped by default, then constant."""

    def __init__(self, optimizer: Any, warmup_min_lr: float | Sequence[float] = 0.0,
                 warmup_max_lr: float | Sequence[float] | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = LOG, last_batch_iteration: int = -1) -> None:
        _check_steps("warmup_num_steps", warmup_num_steps)
        _fresh_start(last_batch_iteration)
        optimizer = _torch_optimizer(optimizer)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _warmup_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        super().__init__(optimizer)

    def _warmup_gamma(self, iteration: int) -> float:
        if self.warmup_type == LOG:
            return self.inverse_log_warm_up * math.log(iteration + 1)
        return iteration / self.warmup_num_steps

    def _gamma(self, iteration: int) -> float:
        return self._warmup_gamma(iteration) if iteration < self.warmup_num_steps else 1.0

    def _rates(self, iteration: int) -> list[float]:
        if iteration < 0:  # before the first step: DeepSpeed starts at the minimum
            return list(self.min_lrs)
        gamma = self._gamma(iteration)
        return [min_lr + (delta_lr * gamma) for min_lr, delta_lr in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps`` (``warmup_max_lr`` defaults to 0.001 here)."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: float | Sequence[float] = 0.0,
                 warmup_max_lr: float | Sequence[float] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = LOG, last_batch_iteration: int = -1) -> None:
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            _log.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return self._warmup_gamma(iteration)
        return max(0.0, float(self.total_num_steps - iteration) /
                   float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_DeepSpeedSchedule):
    """The optimizer's lr times a ratio: warmup from ``warmup_min_ratio`` to 1, then cosine to
    ``cos_min_ratio`` at ``total_num_steps``. The rate before the first step is 0."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = LOG,
                 last_batch_iteration: int = -1) -> None:
        _check_steps("warmup_num_steps", warmup_num_steps)
        _fresh_start(last_batch_iteration)
        optimizer = _torch_optimizer(optimizer)
        self.total_num_steps = total_num_steps
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = _warmup_type(warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            _log.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)
        self.org_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        super().__init__(optimizer)

    def _ratio(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            if self.warmup_type == LOG:
                ratio = self.inverse_log_warm_up * math.log(iteration + 1)
            else:
                ratio = iteration / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        real_last_step = iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_last_step / real_total_steps)  # stays at the floor past the end
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * ratio)

    def _rates(self, iteration: int) -> list[float]:
        if iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self._ratio(iteration)
        return [org_lr * ratio for org_lr in self.org_lrs]


class LRRangeTest(_DeepSpeedSchedule):
    """``lr_range_test_min_lr x (1 + step_rate x interval)``, the interval growing every
    ``lr_range_test_step_size`` batches (continuously, or in stairs)."""

    def __init__(self, optimizer: Any, lr_range_test_min_lr: float | Sequence[float] = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1) -> None:
        _check_steps("lr_range_test_step_size", lr_range_test_step_size)
        _fresh_start(last_batch_iteration)
        optimizer = _torch_optimizer(optimizer)
        self.min_lr = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size, self.step_rate = lr_range_test_step_size, lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer)

    def _rates(self, iteration: int) -> list[float]:
        interval = float(iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        increase = 1 + self.step_rate * interval
        return [min_lr * increase for min_lr in self.min_lr]


class OneCycle(_DeepSpeedSchedule):
    """1Cycle: lr from ``cycle_min_lr`` up to ``cycle_max_lr`` and back over a cycle, then optional decay;
    with ``cycle_momentum`` (and an optimizer with betas) beta1 moves inversely, beta2 set to 0.99."""

    def __init__(self, optimizer: Any, cycle_min_lr: float | Sequence[float], cycle_max_lr: float | Sequence[float],
                 decay_lr_rate: float = 0., cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None,
                 decay_step_size: int = 0, cycle_momentum: bool = True, cycle_min_mom: float = 0.8,
                 cycle_max_mom: float = 0.9, decay_mom_rate: float = 0., last_batch_iteration: int = -1) -> None:
        _fresh_start(last_batch_iteration)
        optimizer = _torch_optimizer(optimizer)
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {first}")
        if second < 0:
            raise ValueError(f"cycle_second_step_size must be non-negative, got {second}")
        self.total_size, self.step_ratio = first + second, first / (first + second)
        self.first_step_size, self.second_step_size = first, second
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None \
            else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate, self.decay_mom_rate = decay_lr_rate, decay_mom_rate
        no_decay = math.isclose(decay_step_size, 0)
        self.skip_lr_decay = no_decay or math.isclose(decay_lr_rate, 0)
        self.skip_mom_decay = no_decay
        self.cycle_momentum = cycle_momentum and "betas" in optimizer.defaults
        if cycle_momentum and not self.cycle_momentum:
            _log.warning("cycle_momentum is disabled because optimizer %s does not support momentum, no betas "
                         "attribute in defaults", type(optimizer).__name__)
        if self.cycle_momentum:
            self.skip_mom_decay = no_decay or math.isclose(decay_mom_rate, 0)
            self.min_moms = [(mom, 0.99) for mom in _per_group(optimizer, cycle_min_mom, "cycle_min_mom")]
            self.max_moms = [(mom, 0.99) for mom in _per_group(optimizer, cycle_max_mom, "cycle_max_mom")]
        super().__init__(optimizer)
        if self.cycle_momentum:  # DeepSpeed starts at the lower momentum, then follows the cycle
            for momentum, group in zip(self.min_moms, self.optimizer.param_groups):
                group["betas"] = momentum

    def _scale_factor(self, iteration: int) -> float:
        batch_iteration = iteration + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1. + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # hold the value flat over each stair, from the integer position in the cycle
            position = batch_iteration % self.total_size
            if position <= self.first_step_size:
                stair = position * stairs / self.first_step_size
            else:
                stair = (self.total_size - position) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def _rates(self, iteration: int) -> list[float]:
        if iteration < self.total_size:
            scale = self._scale_factor(iteration)
            return [low + (high - low) * scale for low, high in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1 + self.decay_lr_rate * ((iteration - self.total_size + 1) / self.decay_step_size)
        return [low / factor for low in self.min_lrs]

    def _momentums(self, iteration: int) -> list[tuple[float, float]]:
        if iteration < self.total_size:
            scale = self._scale_factor(iteration)
            return [(high[0] - (high[0] - low[0]) * scale, low[1]) for low, high in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        factor = 1 + self.decay_mom_rate * ((iteration - self.total_size + 1) / self.decay_step_size)
        return [(beta0 * factor, beta1) for beta0, beta1 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:  # type: ignore[override]
        super().step(last_batch_iteration)
        if self.cycle_momentum and hasattr(self, "max_moms"):
            for group, momentum in zip(self.optimizer.param_groups, self._momentums(self.last_batch_iteration)):
                group["betas"] = momentum
