"""Lowering passes and ``build``: compute-only order -> + load/send/recv -> + reduce/step -> one transfer order.

Each schedule module only orders Forward/Backward per rank; everything else is added here.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pipegrid.schedules import gpipe, inference, interleaved, one_f_one_b, zero_bubble
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.fusion import order_transfers
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Forward, Instruction,
    LoadMicroBatch, OptimizerStep, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads,
    SendActivation, SendGrad,
)
from pipegrid.schedules.schedule import Schedule

__all__ = ["build", "SCHEDULE_NAMES", "add_communication", "add_step"]

_ComputeOrder = Callable[[int, int, int], list[list[ComputeInstruction]]]
# name -> (compute order, training, split backward by default)
_SCHEDULES: dict[str, tuple[_ComputeOrder, bool, bool]] = {
    "gpipe": (gpipe.compute_order, True, False),
    "1f1b": (one_f_one_b.compute_order, True, False),
    "interleaved_1f1b": (interleaved.compute_order, True, False),
    "zb_h1": (zero_bubble.compute_order, True, True),
    "inference": (inference.compute_order, False, False),
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_SCHEDULES)


def build(name: str, num_stages: int, micro_batches: int, virtual_stages: int = 1, *,
          split_backward: bool | None = None, coalesce: int = 1) -> Schedule:
    """Build the named schedule: every rank's full stream for one step.

    ``split_backward=None`` takes the schedule's own choice (only ``zb_h1`` splits);
    ``True`` on another training schedule runs each Backward as BackwardInput then
    BackwardWeight at the same place. ``coalesce=k`` builds the schedule over groups
    of k micro-batches: each group's ops run back to back, one micro-batch at a time,
    and its tensors cross between stages as one message.
    """
    if name not in _SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    _check_sizes(name, num_stages, micro_batches, virtual_stages, coalesce)
    compute_order, training, split_default = _SCHEDULES[name]
    split = _resolve_split(name, training, split_default, split_backward)
    order = compute_order(num_stages, micro_batches // coalesce, virtual_stages)
    if coalesce > 1:
        order = [_expand_groups(ops, coalesce) for ops in order]
    if split and not split_default:
        order = [_split_in_place(ops) for ops in order]
    streams = add_communication(order, num_stages, virtual_stages)
    if training:
        streams = add_step(streams)
    return order_transfers(Schedule(
        name=name, num_stages=num_stages, micro_batches=micro_batches,
        virtual_stages=virtual_stages, streams=tuple(tuple(s) for s in streams),
        training=training, split_backward=split, coalesce=coalesce,
    ))


def _expand_groups(ops: Sequence[ComputeInstruction], k: int) -> list[ComputeInstruction]:
    """Group-level ops (micro_batch = group index) -> k ops each, one per micro-batch."""
    return [type(op)(op.stage, op.micro_batch * k + q) for op in ops for q in range(k)]


def _check_sizes(name: str, p: int, m: int, v: int, k: int) -> None:
    for label, value in (("num_stages", p), ("micro_batches", m), ("virtual_stages", v),
                         ("coalesce", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ScheduleError(f"{label} must be >= 1, got {value}; set {label}=1 or more")
    if v > 1 and name not in ("interleaved_1f1b", "inference"):
        raise ScheduleError(
            f"{name} runs one model chunk per rank, got virtual_stages={v}; "
            f"set virtual_stages=1 or use schedule 'interleaved_1f1b'")
    if m % k:
        raise ScheduleError(
            f"micro_batches={m} is not a multiple of coalesce={k}; a message carries a "
            f"whole group of coalesce micro-batches: pick a divisor of {m} for coalesce "
            f"or change micro_batches")
    if name == "interleaved_1f1b":
        interleaved.check(p, m, v)  # its own words first: coalesce matters only when set
        if v > 1 and k > 1 and (m // k) % p:
            raise ScheduleError(
                f"interleaved_1f1b with coalesce={k} needs micro_batches/coalesce to be a "
                f"multiple of num_stages={p} (groups go through in rounds of {p}), got "
                f"{m}/{k}={m // k}; set micro_batches={k * p * -(-(m // k) // p)} or a "
                f"smaller coalesce")


def _resolve_split(name: str, training: bool, default: bool, requested: bool | None) -> bool:
    if requested is None or requested == default:
        return default
    if not training:
        raise ScheduleError(f"{name} has no backward to split; leave split_backward unset")
    if default:
        raise ScheduleError(
            f"{name} is defined by its split backward; use '1f1b' for a full backward")
    return True


def _split_in_place(ops: Sequence[ComputeInstruction]) -> list[ComputeInstruction]:
    out: list[ComputeInstruction] = []
    for op in ops:
        if isinstance(op, Backward):
            out += [BackwardInput(op.stage, op.micro_batch),
                    BackwardWeight(op.stage, op.micro_batch)]
        else:
            out.append(op)
    return out


def add_communication(order: Sequence[Sequence[ComputeInstruction]], num_stages: int,
                      virtual_stages: int) -> list[list[Instruction]]:
    """Pass 1: Recv just before its consumer, then Load for first/last-stage F, Send just after.

    Adjacent model stages on the same rank (p=1, or v>1 with p=1) hand tensors over
    in memory, so no communication is emitted between them.
    """
    last = num_stages * virtual_stages - 1
    streams: list[list[Instruction]] = []
    for rank, ops in enumerate(order):
        stream: list[Instruction] = []
        for op in ops:
            s, mb = op.stage, op.micro_batch
            if isinstance(op, Forward):
                if s > 0 and (s - 1) % num_stages != rank:
                    stream.append(RecvActivation(s, mb))
                if s in (0, last):  # after the receive, so a send before it can pair with it
                    stream.append(LoadMicroBatch(s, mb))
                stream.append(op)
                if s < last and (s + 1) % num_stages != rank:
                    stream.append(SendActivation(s, mb))
            elif isinstance(op, (Backward, BackwardInput)):
                if s < last and (s + 1) % num_stages != rank:
                    stream.append(RecvGrad(s, mb))
                stream.append(op)
                if s > 0 and (s - 1) % num_stages != rank:
                    stream.append(SendGrad(s, mb))
            else:
                stream.append(op)
        streams.append(stream)
    return streams


def add_step(streams: Sequence[Sequence[Instruction]]) -> list[list[Instruction]]:
    """Pass 3: tied-grad reduce, data-parallel reduce and optimizer step end every stream."""
    return [[*stream, ReduceTiedGrads(), ReduceGrads(), OptimizerStep()] for stream in streams]
