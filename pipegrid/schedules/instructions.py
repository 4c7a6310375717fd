"""Instructions: the frozen dataclasses a schedule is made of, and their compact text form.

``1F3`` is model stage 1 forward of micro-batch 3; ``parse_instruction`` reads it back.
``2SG3*`` is a gradient message that also carries the step's loss statistics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Union

from pipegrid.schedules.errors import ScheduleError

__all__ = [
    "LoadMicroBatch", "Forward", "Backward", "BackwardInput", "BackwardWeight",
    "SendActivation", "RecvActivation", "SendGrad", "RecvGrad",
    "SendToken", "RecvToken", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep", "Exchange",
    "Instruction", "MicroBatchInstruction", "ComputeInstruction",
    "parse_instruction", "is_compute", "is_send", "is_recv", "message_of", "parts",
]


@dataclass(frozen=True)
class _MicroBatchOp:
    """Base of every instruction that acts on one micro-batch at one model stage."""

    stage: int
    """Model stage in ``[0, num_ranks * virtual_stages)``; its rank is the placement's."""
    micro_batch: int
    """Micro-batch index in ``[0, micro_batches)``."""

    code: ClassVar[str] = "?"

    def __str__(self) -> str:
        return f"{self.stage}{self.code}{self.micro_batch}"


@dataclass(frozen=True)
class LoadMicroBatch(_MicroBatchOp):
    """Read micro-batch inputs (first stage) and/or labels (last stage) from the data iterator."""

    code: ClassVar[str] = "L"


@dataclass(frozen=True)
class Forward(_MicroBatchOp):
    """Run the stage forward on one micro-batch and keep its activations for backward."""

    code: ClassVar[str] = "F"


@dataclass(frozen=True)
class Backward(_MicroBatchOp):
    """Full backward: input gradient and weight gradient together; frees the activations."""

    code: ClassVar[str] = "B"


@dataclass(frozen=True)
class BackwardInput(_MicroBatchOp):
    """Input-gradient half of a split backward (zero-bubble); unblocks the previous stage."""

    code: ClassVar[str] = "I"


@dataclass(frozen=True)
class BackwardWeight(_MicroBatchOp):
    """Weight-gradient half of a split backward; nobody waits for it, so it fills bubbles."""

    code: ClassVar[str] = "W"


@dataclass(frozen=True)
class _P2POp(_MicroBatchOp):
    """Point-to-point transfer between adjacent model stages (``peer_stage``)."""

    offset: ClassVar[int] = 0

    @property
    def peer_stage(self) -> int:
        """The model stage on the other end of this transfer."""
        return self.stage + self.offset


@dataclass(frozen=True)
class SendActivation(_P2POp):
    """Send this stage's output of the micro-batch to ``stage + 1``."""

    code: ClassVar[str] = "SA"
    offset: ClassVar[int] = 1


@dataclass(frozen=True)
class RecvActivation(_P2POp):
    """Receive this stage's input of the micro-batch from ``stage - 1``."""

    code: ClassVar[str] = "RA"
    offset: ClassVar[int] = -1


@dataclass(frozen=True)
class _GradOp(_P2POp):
    """A gradient transfer, which may also carry the step's loss statistics."""

    loss: bool = False
    """The message also carries (mean loss of the step, any non-finite loss) from the last
    stage: ``lower.mark_loss_messages`` picks one such message into every rank, so no rank
    needs a collective to learn the step's loss. Written ``2SG3*``."""

    def __str__(self) -> str:
        return super().__str__() + ("*" if self.loss else "")


@dataclass(frozen=True)
class SendGrad(_GradOp):
    """Send the gradient of this stage's input to ``stage - 1``."""

    code: ClassVar[str] = "SG"
    offset: ClassVar[int] = -1


@dataclass(frozen=True)
class RecvGrad(_GradOp):
    """Receive the gradient of this stage's output from ``stage + 1``."""

    code: ClassVar[str] = "RG"
    offset: ClassVar[int] = 1


@dataclass(frozen=True)
class SendToken(_MicroBatchOp):
    """Generation: the last stage sends the token it sampled for item ``micro_batch`` to stage 0,
    which feeds it in as the next item of that micro-batch. ``stage`` is the last stage."""

    code: ClassVar[str] = "ST"

    @property
    def peer_stage(self) -> int:
        return 0


@dataclass(frozen=True)
class RecvToken(_MicroBatchOp):
    """Generation: stage 0 receives the token the last stage (``stage``) sampled for item
    ``micro_batch``. Named by the sending stage, as the message is; it runs on stage 0's rank."""

    code: ClassVar[str] = "RT"

    @property
    def peer_stage(self) -> int:
        return self.stage


@dataclass(frozen=True)
class _RankOp:
    """Base of the once-per-step, per-rank instructions (no stage, no micro-batch)."""

    code: ClassVar[str] = "?"

    def __str__(self) -> str:
        return self.code


@dataclass(frozen=True)
class ReduceTiedGrads(_RankOp):
    """All-reduce gradients of tied layers among the stages that share them."""

    code: ClassVar[str] = "TIED"


@dataclass(frozen=True)
class ReduceGrads(_RankOp):
    """All-reduce (or reduce-scatter, ZeRO-1) gradients over the data-parallel group."""

    code: ClassVar[str] = "REDUCE"


@dataclass(frozen=True)
class OptimizerStep(_RankOp):
    """Apply the optimizer to this rank's parameters."""

    code: ClassVar[str] = "STEP"


@dataclass(frozen=True)
class Exchange:
    """Sends and receives posted together as one group (one ``batch_isend_irecv``).

    NCCL runs a rank's transfers in issue order, and a send completes only when its
    receive runs: two ranks that each send before receiving from the other wait on
    each other forever, and so does a ring of ranks that each send before receiving.
    A group's members move at once. ``0SA2+0RG1`` sends stage 0's output of
    micro-batch 2 and posts the receive of micro-batch 1's gradient; the data of a
    receive is waited for only where it is read.
    """

    ops: tuple[SendActivation | SendGrad | RecvActivation | RecvGrad | SendToken | RecvToken, ...]
    """The group's sends and receives, in the order the rank would run them alone."""

    code: ClassVar[str] = "X"

    def __str__(self) -> str:
        return "+".join(str(op) for op in self.ops)


MicroBatchInstruction = Union[
    LoadMicroBatch, Forward, Backward, BackwardInput, BackwardWeight,
    SendActivation, RecvActivation, SendGrad, RecvGrad, SendToken, RecvToken,
]
ComputeInstruction = Union[Forward, Backward, BackwardInput, BackwardWeight]
Instruction = Union[MicroBatchInstruction, Exchange, ReduceTiedGrads, ReduceGrads, OptimizerStep]

_MICRO_BATCH_TYPES: dict[str, type] = {
    cls.code: cls
    for cls in (LoadMicroBatch, Forward, Backward, BackwardInput, BackwardWeight,
                SendActivation, RecvActivation, SendGrad, RecvGrad, SendToken, RecvToken)
}
_RANK_TYPES: dict[str, type] = {
    cls.code: cls for cls in (ReduceTiedGrads, ReduceGrads, OptimizerStep)
}
_COMPACT = re.compile(r"^(\d+)([A-Z]{1,2})(\d+)(\*?)$")


def parse_instruction(text: str) -> Instruction:
    """Parse the compact form (``1F3``, ``2SA0``, ``1SA3+1RG2``, ``STEP``) back into an instruction."""
    token = text.strip()
    if "+" in token:
        ops = tuple(parse_instruction(part) for part in token.split("+"))
        if not all(is_send(op) or is_recv(op) for op in ops):
            raise ScheduleError(f"cannot parse exchange {text!r}: expected sends and receives joined "
                                "by '+', such as '0SA2+0RG1'")
        return Exchange(ops)  # type: ignore[arg-type]
    if token in _RANK_TYPES:
        return _RANK_TYPES[token]()
    match = _COMPACT.match(token)
    cls = _MICRO_BATCH_TYPES.get(match.group(2)) if match else None
    if cls is None or (match.group(4) and not issubclass(cls, _GradOp)):  # type: ignore[union-attr]
        known = ", ".join([*_MICRO_BATCH_TYPES, *_RANK_TYPES])
        raise ScheduleError(
            f"cannot parse instruction {text!r}: expected <stage><code><micro_batch> "
            f"such as '1F3' (a gradient message carrying the loss: '1SG3*') or one of "
            f"TIED/REDUCE/STEP (codes: {known})"
        )
    stage, _, micro_batch, loss = match.groups()  # type: ignore[union-attr]
    if loss:
        return cls(int(stage), int(micro_batch), loss=True)
    return cls(int(stage), int(micro_batch))


def is_compute(op: Instruction) -> bool:
    """True for Forward, Backward, BackwardInput and BackwardWeight."""
    return isinstance(op, (Forward, Backward, BackwardInput, BackwardWeight))


def is_send(op: Instruction) -> bool:
    """True for SendActivation, SendGrad and SendToken."""
    return isinstance(op, (SendActivation, SendGrad, SendToken))


def is_recv(op: Instruction) -> bool:
    """True for RecvActivation, RecvGrad and RecvToken."""
    return isinstance(op, (RecvActivation, RecvGrad, RecvToken))


def parts(op: Instruction) -> tuple[Instruction, ...]:
    """The single instructions ``op`` runs: an Exchange's send and receive, else ``op``."""
    return op.ops if isinstance(op, Exchange) else (op,)


def message_of(op: Instruction) -> tuple[str, int, int]:
    """The tensor a send or receive carries, named alike on both ends.

    ``("activation", s, mb)`` is the input of model stage s; ``("grad", s, mb)`` the
    gradient of model stage s's output; ``("token", s, mb)`` the token last stage s sampled
    for generation item mb. ``1SA3`` and ``2RA3`` both carry ("activation", 2, 3).
    """
    if isinstance(op, (SendToken, RecvToken)):
        return ("token", op.stage, op.micro_batch)
    if isinstance(op, SendActivation):
        return ("activation", op.stage + 1, op.micro_batch)
    if isinstance(op, RecvActivation):
        return ("activation", op.stage, op.micro_batch)
    if isinstance(op, SendGrad):
        return ("grad", op.stage - 1, op.micro_batch)
    if isinstance(op, RecvGrad):
        return ("grad", op.stage, op.micro_batch)
    raise TypeError(f"{op} ({type(op).__name__}) is not a send or receive")
