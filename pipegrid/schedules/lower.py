"""Lowering passes and ``build``: compute-only order -> + load/send/recv -> + reduce/step
-> the loss message -> one transfer order.

Each schedule module only orders Forward/Backward per rank; everything else is added here,
as explicit instructions that ``validate`` checks, ``simulate`` times and the executor runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pipegrid.schedules import registry
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.fusion import order_transfers
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Forward, Instruction,
    LoadMicroBatch, OptimizerStep, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads,
    SendActivation, SendGrad,
)
from pipegrid.schedules.loss_message import mark_loss_messages
from pipegrid.schedules.placement import Placement
from pipegrid.schedules.registry import SCHEDULE_NAMES
from pipegrid.schedules.schedule import Schedule

__all__ = ["build", "SCHEDULE_NAMES", "add_communication", "add_step", "lower"]


def build(name: str, num_ranks: int, micro_batches: int, virtual_stages: int = 1, *,
          split_backward: bool | None = None, coalesce: int = 1, placement: str | None = None,
          early_receives: bool = True) -> Schedule:
    """Build the named schedule: every rank's full stream for one step.

    ``num_ranks``: the pipeline degree p (``topology.pipe``); ``virtual_stages``: model
    stages (chunks) per rank, so the model is cut into ``num_ranks * virtual_stages`` stages.

    ``split_backward=None`` takes the schedule's own choice; ``True`` on a training
    schedule that does not split runs each Backward as BackwardInput then
    BackwardWeight at the same place. ``coalesce=k`` builds the schedule over groups
    of k micro-batches: each group's ops run back to back, one micro-batch at a time,
    and its tensors cross between stages as one message. ``placement`` (``loop`` or
    ``v``) must be the schedule's own; only ``inference`` takes the caller's.
    ``early_receives`` posts each receive as early as the transfer order allows
    (``Schedule.early_receives``); turn it off when every activation waits for a shape header
    (``comm.dynamic_shapes``), which would then block the rank early.
    """
    spec = registry.get(name)
    _check_sizes(num_ranks, micro_batches, virtual_stages, coalesce)
    spec.check_chunks(virtual_stages)
    if spec.check is not None:
        spec.check(num_ranks, micro_batches, virtual_stages, coalesce)
    where = Placement(spec.placement_for(virtual_stages, placement), num_ranks, virtual_stages)
    split = _resolve_split(spec, split_backward)
    order = spec.compute_order(where, micro_batches // coalesce)
    if coalesce > 1:
        order = [_expand_groups(ops, coalesce) for ops in order]
    if split and not spec.split_backward:
        order = [_split_in_place(ops) for ops in order]
    return lower(Schedule(name=name, placement=where, micro_batches=micro_batches, streams=(),
                          training=spec.training, split_backward=split, coalesce=coalesce,
                          early_receives=early_receives), order)


def lower(schedule: Schedule, order: Sequence[Sequence[ComputeInstruction]]) -> Schedule:
    """Every pass after the compute order: transfers, loads, the step, the loss message, one
    transfer order. ``schedule`` gives the shape (its streams are replaced)."""
    streams = add_communication(order, schedule.placement)
    if schedule.training:
        streams = add_step(streams)
    schedule = dataclasses.replace(schedule, streams=tuple(tuple(s) for s in streams))
    return order_transfers(mark_loss_messages(schedule))


def _expand_groups(ops: Sequence[ComputeInstruction], k: int) -> list[ComputeInstruction]:
    """Group-level ops (micro_batch = group index) -> k ops each, one per micro-batch."""
    return [type(op)(op.stage, op.micro_batch * k + q) for op in ops for q in range(k)]


def _check_sizes(p: int, m: int, v: int, k: int) -> None:
    for label, value in (("num_ranks", p), ("micro_batches", m), ("virtual_stages", v),
                         ("coalesce", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ScheduleError(f"{label} must be >= 1, got {value}; set {label}=1 or more")
    if m % k:
        raise ScheduleError(
            f"micro_batches={m} is not a multiple of coalesce={k}; a message carries a "
            f"whole group of coalesce micro-batches: pick a divisor of {m} for coalesce "
            f"or change micro_batches")


def _resolve_split(spec: registry.ScheduleSpec, requested: bool | None) -> bool:
    if requested is None or requested == spec.split_backward:
        return spec.split_backward
    if not spec.training:
        raise ScheduleError(f"{spec.name} has no backward to split; leave split_backward unset")
    if spec.split_backward:
        raise ScheduleError(
            f"{spec.name} is defined by its split backward; use '1f1b' for a full backward")
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


def add_communication(order: Sequence[Sequence[ComputeInstruction]],
                      placement: Placement) -> list[list[Instruction]]:
    """Pass 1: Recv just before its consumer, then Load for first/last-stage F, Send just after.

    Adjacent model stages on the same rank (p=1, the turn of a V) hand tensors over in
    memory, so no communication is emitted between them.
    """
    last = placement.num_stages - 1
    streams: list[list[Instruction]] = []
    for ops in order:
        stream: list[Instruction] = []
        for op in ops:
            s, mb = op.stage, op.micro_batch
            before = s > 0 and not placement.same_rank(s - 1, s)  # the previous stage is remote
            after = s < last and not placement.same_rank(s, s + 1)  # the next stage is remote
            if isinstance(op, Forward):
                if before:
                    stream.append(RecvActivation(s, mb))
                if s in (0, last):  # after the receive, so a send before it can pair with it
                    stream.append(LoadMicroBatch(s, mb))
                stream.append(op)
                if after:
                    stream.append(SendActivation(s, mb))
            elif isinstance(op, (Backward, BackwardInput)):
                if after:
                    stream.append(RecvGrad(s, mb))
                stream.append(op)
                if before:
                    stream.append(SendGrad(s, mb))
            else:
                stream.append(op)
        streams.append(stream)
    return streams


def add_step(streams: Sequence[Sequence[Instruction]]) -> list[list[Instruction]]:
    """Pass 3: tied-grad reduce, data-parallel reduce and optimizer step end every stream."""
    return [[*stream, ReduceTiedGrads(), ReduceGrads(), OptimizerStep()] for stream in streams]
