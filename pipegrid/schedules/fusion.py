"""Lowering pass: order every rank's transfers by one global message order, then post
each run of adjacent transfers as one ``Exchange`` group.

NCCL runs a rank's transfers in issue order on one stream, and a send completes only
when its receive runs. Ranks that each send before receiving from the other (1F1B's
steady state, with zero-bubble's W between) or a ring of ranks that each send on before
receiving (interleaved chunks) then wait on each other forever. The cure is an order:

1. Time the schedule once (unit costs, exact arithmetic, a positive message latency) so
   that a message's ready time is later than that of every message it depends on.
2. Sort all messages by (ready time, sender rank, sender position): one global order,
   consistent with causality and with every sender's program order.
3. On each rank keep compute and sends where they are and move each receive up to just
   after the rank's last transfer that comes before it in the global order.

Every rank then issues its transfers in the global order, so the earliest unfinished
message heads both its sender's and its receiver's stream and always completes: no
deadlock under NCCL (one stream per rank or per peer) or gloo, by construction. A
receive posted early never holds compute up (only the op that reads the data waits),
and transfers left adjacent are posted together, so they move at once::

    before   rank r: F2 SA2 ............ RG1 B1     rank q: I1 SG1 W0 RA2 F2
    after    rank r: F2 [SA2+RG1] ....... B1        rank q: I1 [SG1+RA2] W0 F2

4. With ``Schedule.early_receives`` move each receive further up, to just after the rank's
   transfer before it in the global order (the order stays the same on every rank, so step 3's
   argument holds), but never above what the executor needs to post it: a gradient's buffer is
   sized by the forward's output, so not above that forward; a stage's first activation waits
   for its header, so it stays where step 3 put it. On gloo a receive posted before its send
   lets the send write at once; one posted after makes the sender's progress thread answer it,
   on a core its rank keeps busy (a wake-up on the critical path)::

    step 3   rank 0: F3 [RG0+SA3] I0 W0 RA2 F2'     step 4   rank 0: F3 [RG0+SA3+RA2] I0 W0 F2'

``validate`` plays the result out under both transports' rules anyway.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from pipegrid.schedules.instructions import Exchange, Instruction, is_recv, is_send, parts
from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.simulate import play, simulate

__all__ = ["order_transfers"]

_Message = tuple[str, int, int]
# unit costs; the latency only makes a message that depends on another strictly later
_COSTS = {"F": 64, "B": 32, "W": 32, "comm": 1}  # integers: exact, and fast; a full backward costs B + W


def order_transfers(schedule: Schedule) -> Schedule:
    """``schedule`` with each rank's transfers in the global message order, adjacent ones grouped."""
    flat = tuple(tuple(part for op in stream for part in parts(op)) for stream in schedule.streams)
    schedule = dataclasses.replace(schedule, streams=flat)  # groups apart: the pass may run again
    rank_of_message = _global_order(schedule)
    streams = []
    for stream in schedule.streams:
        placed = _place_receives(schedule, stream, rank_of_message)
        if schedule.early_receives:
            placed = _hoist_receives(schedule, placed, rank_of_message)
        streams.append(tuple(_group_adjacent(schedule, placed)))
    return dataclasses.replace(schedule, streams=tuple(streams))


def _moves(schedule: Schedule, op: Instruction) -> bool:
    return (is_send(op) or is_recv(op)) and schedule.transfers(op)


def _global_order(schedule: Schedule) -> dict[_Message, int]:
    """message -> its index in the one order every rank issues its transfers in."""
    keyed = sorted((when, message) for message, when in _ready_times(schedule).items())
    return {message: index for index, (_, message) in enumerate(keyed)}


def _ready_times(schedule: Schedule) -> dict[_Message, tuple[int, int, int]]:
    """message -> (time its send is posted, sender rank, sender position), the schedule played
    out by the simulator at ``_COSTS``."""
    played = play(schedule, _COSTS)
    if played is None:
        simulate(schedule, _COSTS)  # raises, naming the ops that wait on each other
    start, _ = played
    return {schedule.message_key(op): (start[(rank, position)], rank, position)
            for rank, stream in enumerate(schedule.streams) for position, op in enumerate(stream)
            if _moves(schedule, op) and is_send(op)}


def _place_receives(schedule: Schedule, stream: tuple[Instruction, ...],
                    order: dict[_Message, int]) -> list[Instruction]:
    """Sends and compute stay; each moving receive goes just before the first of the rank's
    sends that follows it in ``order``, and never later than where it stood."""
    out: list[Instruction] = []
    receives = sorted((op for op in stream if _moves(schedule, op) and is_recv(op)),
                      key=lambda op: order[schedule.message_key(op)])
    pending, placed = deque(receives), set()
    for op in stream:
        if _moves(schedule, op) and is_recv(op):
            while op not in placed:  # where it stood, after those ordered before it
                placed.add(pending[0])
                out.append(pending.popleft())
            continue
        if _moves(schedule, op):  # a send: every receive ordered before it goes first
            while pending and order[schedule.message_key(pending[0])] < order[schedule.message_key(op)]:
                placed.add(pending[0])
                out.append(pending.popleft())
        out.append(op)
    assert not pending, "every receive is placed"
    return out


def _hoist_receives(schedule: Schedule, placed: list[Instruction], order: dict[_Message, int]) -> list[Instruction]:
    """Step 4: each moving receive as early as the global order and the executor allow (module
    docstring); ``placed`` has them as late as allowed (step 3), which bounds them from below.

    A gradient's receive never rises above its forward: the forward's send on (or, under
    coalesce, its group's last) comes before it in the global order, as the gradient depends on it.
    """
    rest = [op for op in placed if not (_moves(schedule, op) and is_recv(op))]
    sends = [(order[schedule.message_key(op)], i) for i, op in enumerate(rest) if _moves(schedule, op)]
    at: dict[int, list[Instruction]] = {}
    kept = earliest = taken = 0  # rest-ops before the receive; where the last receive went; sends passed
    for op in placed:  # receives and sends both come in the global order: one pass
        if not (_moves(schedule, op) and is_recv(op)):
            kept += 1
            continue
        where = kept
        if _sized_without_header(schedule, op):
            mine = order[schedule.message_key(op)]
            while taken < len(sends) and sends[taken][0] < mine and sends[taken][1] < kept:
                earliest = max(earliest, sends[taken][1] + 1)
                taken += 1
            where = earliest
        earliest = where
        at.setdefault(where, []).append(op)
    out: list[Instruction] = []
    for i, op in enumerate(rest):
        out += at.pop(i, [])
        out.append(op)
    return out + at.pop(len(rest), [])


def _sized_without_header(schedule: Schedule, receive: Instruction) -> bool:
    """Whether the executor can post ``receive`` without first waiting for a shape header: a
    gradient (sized by the forward's output), or an activation after its stage's first."""
    kind, _, micro_batch = schedule.message_key(receive)
    return kind == "grad" or kind == "activation" and micro_batch > 0


def _group_adjacent(schedule: Schedule, stream: list[Instruction]) -> list[Instruction]:
    """Runs of adjacent transfers become one Exchange (a group only ever lets more move)."""
    out: list[Instruction] = []
    run: list[Instruction] = []
    for op in [*stream, None]:
        if op is not None and _moves(schedule, op):
            run.append(op)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else Exchange(tuple(run)))  # type: ignore[arg-type]
            run = []
        if op is not None:
            out.append(op)
    return out
