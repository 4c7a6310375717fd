"""What one ``train_batch``/``eval_batch`` call carries through the executor: ``StepState``
(everything kept between instructions, per-call settings and results included) and
``StepHooks``, the small typed interface the executor asks of whoever runs it (the engine).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipegrid.pipe.p2p import Received
from pipegrid.pipe.split_backward import WeightGradState

__all__ = ["Key", "StepHooks", "StepState"]

Key = tuple[int, int]  # (model stage, micro-batch)


class StepHooks(Protocol):
    """What the executor asks of whoever runs it, once per step or per micro-batch
    (``PipelineEngine`` is one); everything per instruction is the executor's own."""

    device: torch.device

    def to_device(self, value: Any) -> Any:
        """A data-iterator value on the device, floats in the model's dtype."""

    def scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from (fp16: times the loss scale)."""

    def collective_peers(self, op: Any) -> list[int]:
        """Global ranks a reduce/step instruction talks to (to name one that is lost)."""

    def reduce_tied_grads(self) -> None:
        """Sum tied layers' gradients over the ranks that hold a copy."""

    def reduce_data_parallel_grads(self) -> None:
        """All-reduce (ZeRO-1: reduce-scatter) gradients over the data axis."""

    def optimizer_step(self, losses: dict[int, torch.Tensor], loss_stats: torch.Tensor | None) -> float:
        """Clip and step; the step's mean loss over the global batch (from ``loss_stats``
        when every rank has them, else from an all-reduce of ``losses``)."""


@dataclass
class StepState:
    """Everything one ``train_batch``/``eval_batch`` call keeps between instructions."""

    training: bool
    data_iter: Iterator | None
    hooks: StepHooks
    """The engine's reduce/step/loss hooks for this call."""
    keep_outputs: bool = False
    """eval: keep every micro-batch's last-stage output in ``results``."""
    step_loss: float | None = None
    """The step's mean loss, once OptimizerStep has it."""
    batches: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    inputs: dict[Key, tuple[tuple[torch.Tensor, ...], bool]] = field(default_factory=dict)
    outputs: dict[Key, Any] = field(default_factory=dict)
    output_grads: dict[Key, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    input_grads: dict[Key, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    results: dict[int, Any] = field(default_factory=dict)
    weight_grads: dict[Key, WeightGradState] = field(default_factory=dict)
    loss_stats: torch.Tensor | None = None
    """(mean loss over this step's micro-batches, any non-finite) from the last stage."""
    pending: dict[tuple[str, int, int], tuple[Any, Received]] = field(default_factory=dict)
    """Posted receives not yet read: message -> (its receive instruction, the handle)."""
    events: list[tuple[str, float, float]] = field(default_factory=list)
