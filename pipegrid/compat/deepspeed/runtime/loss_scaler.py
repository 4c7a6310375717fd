"""DeepSpeed 0.19's fp16 loss-scale rule behind the engine's scaler interface (``enabled``, ``scale``,
``update(overflow)``, ``state_dict``), so a ds_config's fp16 section skips and rescales on the same steps.

It differs from pipegrid's own LossScaler: the first raise comes one clean step later
(DeepSpeed counts from the step after the last overflow), and once the hysteresis is spent
every overflow lowers the scale until a raise restores it. Without ZeRO DeepSpeed's fp16
optimizer ignores ``hysteresis`` and never raises at the minimum; with ZeRO-1 it honours both
(deepspeed/runtime/fp16/fused_optimizer.py ``_update_scale``, loss_scaler.py ``DynamicLossScaler``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeepSpeedLossScaler"]


class DeepSpeedLossScaler:
    """Dynamic (or static) fp16 loss scale with DeepSpeed's growth, backoff and hysteresis."""

    enabled = True

    def __init__(self, dynamic: bool = True, init_scale: float = 2.0 ** 16, scale_window: int = 1000,
                 min_scale: float = 1.0, delayed_shift: int = 1, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = False) -> None:
        if scale_window < 1 or delayed_shift < 1 or min_scale <= 0 or init_scale <= 0:
            raise ValueError(f"loss scaling needs scale_window >= 1, delayed_shift (hysteresis) >= 1, min_scale > 0 "
                             f"and init_scale > 0, got {scale_window}, {delayed_shift}, {min_scale}, {init_scale}")
        self.dynamic, self.scale = dynamic, float(init_scale)
        self.scale_window, self.min_scale = scale_window, float(min_scale)
        self.delayed_shift, self.consecutive_hysteresis = delayed_shift, consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter, self.last_overflow_iter, self.cur_hysteresis = 0, -1, delayed_shift

    def update(self, overflow: bool) -> None:
        """Account for one step (a skipped one when ``overflow``)."""
        if self.dynamic and overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.scale == self.min_scale and self.raise_error_at_min_scale:
                    raise FloatingPointError(
                        f"fp16 gradients overflowed at the minimum loss scale {self.min_scale} (step {self.cur_iter});"
                        " DeepSpeed stops here too. Lower the learning rate, clip gradients or train in bf16")
                self.scale = max(self.scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        elif self.dynamic:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = self.cur_iter - self.last_overflow_iter - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.scale *= 2.0
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "cur_iter": self.cur_iter, "last_overflow_iter": self.last_overflow_iter,
                "cur_hysteresis": self.cur_hysteresis}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.cur_iter, self.last_overflow_iter = int(state["cur_iter"]), int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])
