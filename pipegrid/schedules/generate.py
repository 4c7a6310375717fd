"""Generation: a prefill pass, then decode steps, micro-batches in flight at once.

Item ``w = step * m + mb`` is micro-batch mb's forward at decode step ``step`` (step 0 is
the prefill of the whole prompt; each later step feeds one token per sequence). The last
stage samples a token from item w and sends it back to stage 0, where it is item
``w + m``: a ``SendToken``/``RecvToken`` pair the validator plays out like any other
message. Timeline (p=3, m=3, 2 new tokens; ``1F4`` = stage 1, item 4 = micro-batch 1,
step 1)::

    rank 0 | 0F0 0F1 0F2 0F3 0F4 0F5   ·   ·
    rank 1 |   · 1F0 1F1 1F2 1F3 1F4 1F5   ·
    rank 2 |   ·   · 2F0 2F1 2F2 2F3 2F4 2F5

With ``m >= p`` a token is back at stage 0 by the time stage 0 finished the step's other
micro-batches: micro-batch i's token t+1 enters stage 0 while its token t is still in the
later stages, and no rank idles after the fill. With ``m < p`` stage 0 waits each step
for the token (the pipeline is never full: a decode step is one sequential chain).

With several chunks per rank (``virtual_stages``, placed "loop" or "v") each micro-batch's
chain walks the model stages in order across the ranks (down, and for "v" back up), and a
rank interleaves its chunks as items reach them (``compute_order``). A micro-batch whose
sequences all finished leaves: ``skipped`` says which of its instructions then do not run,
on both ends of each message alike, and ``without_left`` is the schedule that then runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.fusion import order_transfers
from pipegrid.schedules.instructions import (
    Exchange,
    Forward,
    Instruction,
    LoadMicroBatch,
    RecvActivation,
    RecvToken,
    SendActivation,
    SendToken,
)
from pipegrid.schedules.lower import add_communication
from pipegrid.schedules.placement import Placement
from pipegrid.schedules.schedule import Schedule

__all__ = ["NAME", "build", "compute_order", "describe", "items", "skipped", "without_left"]

NAME = "generate"


def items(micro_batches: int, new_tokens: int) -> int:
    """How many forward items a generation runs: one per micro-batch per new token."""
    return micro_batches * new_tokens


def compute_order(placement: Placement, micro_batches: int, new_tokens: int) -> list[list[Forward]]:
    """Per rank, every (model stage, item) forward in the order a unit-cost pipeline runs them.

    Each micro-batch is one chain: stage 0 .. S-1 of item w, then (the token fed back) stage 0
    of item w + m. Time is played out in unit slots; in each slot every rank runs, of the
    forwards whose input is ready, the one of the oldest item (tokens return soonest). The
    result is a topological order of the chains, so no rank ever waits on itself. With one
    chunk per rank it is plain item order; with chunks placed "loop" or "v" a rank
    interleaves its chunks as items reach them (rank 0 of a V runs stage 0 of the new items
    between the last stage of the old ones).
    """
    total, last = items(micro_batches, new_tokens), placement.num_stages - 1
    order: list[list[Forward]] = [[] for _ in range(placement.num_ranks)]
    # per micro-batch chain: (its next forward's (item, stage), the slot it may start)
    ready = {mb: (mb, 0, 0) for mb in range(min(micro_batches, total))}
    slot = 0
    while ready:
        chosen: dict[int, tuple[int, int]] = {}  # rank -> (item, stage) it runs in this slot
        for item, stage, start in ready.values():
            rank = placement.rank_of(stage)
            if start <= slot and (rank not in chosen or item < chosen[rank][0]):
                chosen[rank] = (item, stage)
        for rank, (item, stage) in chosen.items():
            order[rank].append(Forward(stage, item))
            mb = item % micro_batches
            if stage < last:
                ready[mb] = (item, stage + 1, slot + 1)
            elif item + micro_batches < total:
                ready[mb] = (item + micro_batches, 0, slot + 1)
            else:
                del ready[mb]
        slot += 1
    return order


def build(num_ranks: int, micro_batches: int, new_tokens: int, virtual_stages: int = 1,
          placement: str = "loop") -> Schedule:
    """The generate schedule: ``new_tokens`` forward steps of ``micro_batches`` micro-batches
    over ``num_ranks`` pipe ranks holding ``virtual_stages`` model stages each (placed "loop"
    or "v", as the training schedule placed them), the sampled tokens fed back."""
    for label, value in (("num_ranks", num_ranks), ("micro_batches", micro_batches),
                         ("new_tokens", new_tokens), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ScheduleError(f"{label} must be >= 1, got {value}; set {label}=1 or more")
    where = Placement(placement, num_ranks, virtual_stages)
    streams = add_communication(compute_order(where, micro_batches, new_tokens), where)
    last = where.num_stages - 1
    if not where.same_rank(0, last):
        streams = [_add_token_transfers(stream, last, micro_batches) for stream in streams]
    schedule = Schedule(name=NAME, placement=where, micro_batches=items(micro_batches, new_tokens),
                        streams=tuple(tuple(s) for s in streams), training=False, feedback=micro_batches)
    return order_transfers(schedule)


def _add_token_transfers(stream: list[Instruction], last: int, feedback: int) -> list[Instruction]:
    """The last stage sends each sampled token right after its forward; stage 0 receives it
    just before the forward that reads it (its item ``feedback`` later)."""
    total = max((op.micro_batch for op in stream if isinstance(op, Forward)), default=-1) + 1
    out: list[Instruction] = []
    for op in stream:
        if isinstance(op, Forward) and op.stage == 0 and op.micro_batch >= feedback:
            out.append(RecvToken(last, op.micro_batch - feedback))
        out.append(op)
        if isinstance(op, Forward) and op.stage == last and op.micro_batch + feedback < total:
            out.append(SendToken(last, op.micro_batch))
    return out


def skipped(op: Instruction, left_at: int | None) -> bool:
    """Whether ``op`` (a forward, load or one transfer, not an Exchange) is not run because its
    micro-batch left the pipeline at item ``left_at`` (the item whose message carried no live
    row; None: it has not left). That item still runs everywhere (its message tells each stage);
    its token is not sent back (none was chosen) and no later item of it runs."""
    if left_at is None or not isinstance(op, (Forward, LoadMicroBatch, SendToken, RecvToken, SendActivation,
                                              RecvActivation)):
        return False
    if isinstance(op, (SendToken, RecvToken)):
        return op.micro_batch >= left_at
    return op.micro_batch > left_at


def without_left(schedule: Schedule, left_at: Mapping[int, int]) -> Schedule:
    """The schedule as it runs once micro-batch ``mb`` left at item ``left_at[mb]``: every
    rank's instructions ``skipped`` removed, Exchange groups shrunk to what remains. Both ends
    of each message drop it alike, so it still plays out under gloo's and NCCL's rules
    (``transports.check_gloo``/``check_nccl``; the unit tests check many)."""
    m = schedule.feedback

    def kept(op: Instruction) -> Instruction | None:
        if isinstance(op, Exchange):
            rest = tuple(part for part in op.ops if not skipped(part, left_at.get(part.micro_batch % m)))
            return None if not rest else rest[0] if len(rest) == 1 else Exchange(rest)
        micro_batch = getattr(op, "micro_batch", None)
        return op if micro_batch is None or not skipped(op, left_at.get(micro_batch % m)) else None

    streams = tuple(tuple(k for k in map(kept, stream) if k is not None) for stream in schedule.streams)
    return dataclasses.replace(schedule, streams=streams)


def describe(schedule: Schedule) -> str:
    """One line: the generation a schedule runs, in the words of ``build``'s arguments."""
    m = schedule.feedback
    return (f"generate: {schedule.num_ranks} ranks, {m} micro-batches in flight, "
            f"{schedule.micro_batches // m} forward steps (prefill + {schedule.micro_batches // m - 1} decode)")




