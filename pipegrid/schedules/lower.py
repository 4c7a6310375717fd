"""Lowering passes and ``build``: compute-only order -> + load/send/recv -> + reduce/step.

Each schedule module only orders Forward/Backward per rank; everything else is added here.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pipegrid.schedules import gpipe, inference, interleaved, one_f_one_b, zero_bubble
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Forward, Instruction,
    LoadMicroBatch, OptimizerStep, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads,
    SendActivation, SendGrad, is_recv, is_send, message_of,
)
from pipegrid.schedules.schedule import Schedule

__all__ = ["build", "SCHEDULE_NAMES", "add_communication", "order_receives", "add_step"]

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
    streams = order_receives(streams, num_stages)
    if training:
        streams = add_step(streams)
    return Schedule(
        name=name, num_stages=num_stages, micro_batches=micro_batches,
        virtual_stages=virtual_stages, streams=tuple(tuple(s) for s in streams),
        training=training, split_backward=split, coalesce=coalesce,
    )


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


def _peer_rank(op: Instruction, num_stages: int) -> int:
    return op.peer_stage % num_stages  # type: ignore[union-attr]




def order_receives(streams: Sequence[Sequence[Instruction]],
                   num_stages: int) -> list[list[Instruction]]:
    """Pass 2: make each directed channel FIFO, as NCCL matches by issue order.

    A channel carries activations and grads both only when p=2 with v>1. Where the
    receiver would take them in another order than they were sent, a receive is
    hoisted to just before the next one in send order (never later than its consumer).
    """
    out = [list(stream) for stream in streams]
    for dst in range(num_stages):
        for src in range(num_stages):
            if src != dst:
                out[dst] = _order_channel(out[src], out[dst], src, dst, num_stages)
    return out


def _order_channel(src_stream: list[Instruction], dst_stream: list[Instruction],
                   src: int, dst: int, num_stages: int) -> list[Instruction]:
    sent = [message_of(op) for op in src_stream
            if is_send(op) and _peer_rank(op, num_stages) == dst]
    on_channel = [i for i, op in enumerate(dst_stream)
                  if is_recv(op) and _peer_rank(op, num_stages) == src]
    if [message_of(dst_stream[i]) for i in on_channel] == sent:
        return dst_stream
    by_message = {message_of(dst_stream[i]): dst_stream[i] for i in on_channel}
    if set(by_message) != set(sent):
        return dst_stream  # unmatched: leave it for validate() to report
    removed = set(on_channel)
    kept = [op for i, op in enumerate(dst_stream) if i not in removed]
    # consumer of a receive = the first kept op after it in the original stream
    kept_index = {i: n for n, i in enumerate(i for i in range(len(dst_stream)) if i not in removed)}
    consumer: dict[tuple[str, int, int], int] = {}
    for i in on_channel:
        nxt = next(j for j in range(i + 1, len(dst_stream)) if j not in removed)
        consumer[message_of(dst_stream[i])] = kept_index[nxt]
    slots: list[int] = [0] * len(sent)
    bound = len(kept)
    for k in range(len(sent) - 1, -1, -1):
        bound = min(bound, consumer[sent[k]])
        slots[k] = bound
    result: list[Instruction] = []
    k = 0
    for n, op in enumerate(kept):
        while k < len(sent) and slots[k] == n:
            result.append(by_message[sent[k]])
            k += 1
        result.append(op)
    return result


def add_step(streams: Sequence[Sequence[Instruction]]) -> list[list[Instruction]]:
    """Pass 3: tied-grad reduce, data-parallel reduce and optimizer step end every stream."""
    return [[*stream, ReduceTiedGrads(), ReduceGrads(), OptimizerStep()] for stream in streams]
