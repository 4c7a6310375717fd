"""What one ``train_batch``/``eval_batch`` call carries through the executor: one
``MicroBatchSlot`` per (model stage, micro-batch), the step's ``StepLoss``, and
``StepHooks``, the small typed interface the executor asks of whoever runs it.

A slot's fields are filled and emptied in schedule order (forward fills ``input`` and
``output``, backward empties them and fills ``input_grad``, a send empties that); at the
end of a step every slot is empty again, or the step leaked (``StepState.leftovers``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from pipegrid.pipe.p2p import Received
from pipegrid.pipe.split_backward import WeightGradState

__all__ = ["Key", "MicroBatchSlot", "StepHooks", "StepLoss", "StepState"]

Key = tuple[int, int]  # (model stage, micro-batch)
Message = tuple[tuple[torch.Tensor, ...], bool]  # (tensors, whether the stage passed a tuple)


class StepHooks(Protocol):
    """What the executor asks of whoever runs it, once per step or per micro-batch
    (the engine's ``GradientUpdate`` is one); everything per instruction is the executor's own."""

    device: torch.device

    def to_device(self, value: Any) -> Any:
        """A data-iterator value on the device, floats in the model's dtype."""

    def scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from (fp16: times the loss scale)."""

    def collective_peers(self, op: Any) -> list[int]:
        """Global ranks a reduce/step instruction talks to (to name one that is lost)."""

    def reduce_tied_grads(self) -> None:
        """Sum tied layers' gradients over the ranks that hold a copy."""

    def weight_grads_done(self) -> None:
        """A model stage has this micro-batch's parameter gradients (after B, or W of a split backward)."""

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        """A split backward's W is about to compute the gradients of ``params``, then of
        ``following`` (ZeRO-3 with ``zero.gather=per_layer`` gathers the one, posts the other)."""

    def reduce_data_parallel_grads(self) -> None:
        """All-reduce (ZeRO-1: reduce-scatter) gradients over the data axis."""

    def optimizer_step(self, loss: StepLoss, statistics: torch.Tensor | None) -> float:
        """Clip and step; the step's mean loss over the global batch (from ``statistics``, the
        last stage's (mean, any non-finite), when every rank has them, else all-reduced)."""


@dataclass
class MicroBatchSlot:
    """What one model stage holds for one micro-batch between its instructions."""

    input: Message | None = None
    """The stage's input (in training, leaves that collect their gradient)."""
    output: Any = None
    """The forward's output until backward (the last stage: its share of the loss)."""
    output_grad: tuple[torch.Tensor, ...] | None = None
    """The gradient of ``output``: received, or handed over by the next stage on this rank."""
    input_grad: tuple[torch.Tensor, ...] | None = None
    """The gradient of ``input``, waiting to be sent to the previous stage."""
    weight_grad: WeightGradState | None = None
    """A split backward's deferred weight half (zero-bubble's W)."""

    def held(self) -> list[str]:
        """The fields still holding something."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class StepLoss:
    """The step's loss, in one place: the last stage records each micro-batch's loss; its
    statistics (mean, any non-finite) travel down the pipeline on the gradient messages the
    schedule marks, or are all-reduced where it marks none; ``mean`` is what every rank returns."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        """micro-batch -> its loss (on the last stage only)."""
        self.received: torch.Tensor | None = None
        """(mean, any non-finite) as the last stage sent them down, on the other stages."""
        self.mean: float | None = None
        """The mean over the global batch, once reduced."""

    def record(self, micro_batch: int, loss: torch.Tensor) -> None:
        self.losses[micro_batch] = loss.detach()

    def local_statistics(self) -> torch.Tensor:
        """(mean of this rank's recorded losses, any of them non-finite) in float64 on the host."""
        losses = torch.stack([self.losses[mb].double().cpu() for mb in sorted(self.losses)])
        return torch.stack([losses.mean(), (~torch.isfinite(losses)).any().double()])

    def statistics(self) -> torch.Tensor | None:
        """This rank's copy of the statistics: computed on the last stage, else received (or None)."""
        return self.local_statistics() if self.losses else self.received


@dataclass
class StepState:
    """Everything one ``train_batch``/``eval_batch`` call keeps between instructions."""

    training: bool
    data_iter: Iterator | None
    keep_outputs: bool = False
    """eval: keep every micro-batch's last-stage output in ``results``."""
    batches: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    """micro-batch -> its (inputs, labels) on the device, read once from ``data_iter``."""
    slots: dict[Key, MicroBatchSlot] = field(default_factory=dict)
    loss: StepLoss = field(default_factory=StepLoss)
    results: dict[int, Any] = field(default_factory=dict)
    pending: dict[tuple[str, int, int], tuple[Any, Received]] = field(default_factory=dict)
    """Posted receives not yet read: message -> (its receive instruction, the handle)."""
    events: list[tuple[str, float, float]] = field(default_factory=list)

    def slot(self, stage: int, micro_batch: int) -> MicroBatchSlot:
        key = (stage, micro_batch)
        if key not in self.slots:
            self.slots[key] = MicroBatchSlot()
        return self.slots[key]

    def take(self, stage: int, micro_batch: int, name: str) -> Any:
        """Empty one field of a slot and return what it held (None if nothing)."""
        slot = self.slot(stage, micro_batch)
        value = getattr(slot, name)
        setattr(slot, name, None)
        return value

    def leftovers(self) -> list[str]:
        """What the step left behind ("stage 1, micro-batch 3: output"): empty after every step."""
        left = [f"stage {stage}, micro-batch {mb}: {', '.join(slot.held())}"
                for (stage, mb), slot in sorted(self.slots.items()) if slot.held()]
        left += [f"a posted receive of {message}, never read" for message in sorted(self.pending)]
        return left
