"""Dynamic loss scaling for float16 training (bf16 and fp32 need none).

The scale multiplies the loss before backward; an overflow anywhere skips the step
on every rank and lowers the scale (after ``hysteresis`` overflows), and
``growth_interval`` clean steps in a row double it.
"""

from __future__ import annotations

from typing import Any


class LossScaler:
    """Megatron/DeepSpeed-style dynamic loss scaler; a fixed scale of 1 when disabled."""

    def __init__(self, enabled: bool, initial_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 backoff_factor: float = 0.5, hysteresis: int = 1, min_scale: float = 1.0) -> None:
        if enabled and not (0 < backoff_factor < 1):
            raise ValueError(f"precision.backoff_factor must be in (0, 1), got {backoff_factor}")
        if enabled and (growth_interval < 1 or hysteresis < 1):
            raise ValueError("precision.growth_interval and precision.hysteresis must be >= 1, got "
                             f"{growth_interval} and {hysteresis}")
        self.enabled = enabled
        self.scale = float(initial_scale) if enabled else 1.0
        self.growth_interval, self.backoff_factor = growth_interval, backoff_factor
        self.hysteresis, self.min_scale = hysteresis, min_scale
        self._good_steps = 0
        self._overflows_left = hysteresis

    def update(self, overflow: bool) -> None:
        """Account for one step: lower the scale on overflow, grow it after a clean run."""
        if not self.enabled:
            return
        if overflow:
            self._good_steps = 0
            self._overflows_left -= 1
            if self._overflows_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
                self._overflows_left = self.hysteresis
            return
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2.0
            self._overflows_left = self.hysteresis

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self._good_steps, "overflows_left": self._overflows_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._overflows_left = int(state["overflows_left"])
