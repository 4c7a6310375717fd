"""The step's loss on gradient messages: a lowering pass that marks them, and its check.

Every rank reports the step's mean loss, which only the last stage's rank computes. Rather
than a world all-reduce after the step, the loss statistics (mean loss, any non-finite)
ride on a gradient message already going down the pipeline. The pass picks, for every
other rank, the earliest gradient message whose sender already knows them; it marks that
SendGrad and its RecvGrad (``loss=True``, written ``2SG3*``). The executor appends the
statistics to exactly the marked messages, ``validate`` checks the marks, ``simulate``
reports when each rank learns the loss::

    1f1b p=3: rank 2 (last stage) 2SG3*  ->  rank 1 1RG3* ... 1SG3*  ->  rank 0 0RG3*
    zb_v p=3: rank 0 holds stage 5, so its stage-5 SendGrad starts the chain: 5SG2* -> rank 1 ...

A schedule in which some rank can receive no such message carries no marks at all, and
every rank then learns the loss from one all-reduce at the step (all or none: the ranks
must agree on the collective).
"""

from __future__ import annotations

import dataclasses

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import Exchange, Forward, Instruction, RecvGrad, SendGrad, parts
from pipegrid.schedules.schedule import Schedule

__all__ = ["mark_loss_messages", "check_loss_messages", "knows_loss_after"]

_Message = tuple[str, int, int]


def _readers(schedule: Schedule, stream: tuple[Instruction, ...]) -> dict[_Message, int]:
    """message -> position of the first op of ``stream`` that reads it."""
    out: dict[_Message, int] = {}
    for position, op in enumerate(stream):
        message = schedule.reads(op)
        if message is not None:
            out.setdefault(message, position)
    return out


def _last_loss(schedule: Schedule) -> int:
    """Position on the loss rank after which every micro-batch's loss is known."""
    last, stream = schedule.num_model_stages - 1, schedule.streams[schedule.loss_rank]
    return 1 + max(i for i, op in enumerate(stream) if isinstance(op, Forward) and op.stage == last)


def _incoming(schedule: Schedule) -> dict[int, list[tuple[int, int, _Message]]]:
    """receiving rank -> (sending rank, send position, message) of every gradient message that moves."""
    out: dict[int, list[tuple[int, int, _Message]]] = {}
    for rank, stream in enumerate(schedule.streams):
        for position, op in enumerate(stream):
            for part in parts(op):
                if isinstance(part, SendGrad) and schedule.transfers(part):
                    dst = schedule.rank_of(part.peer_stage)
                    out.setdefault(dst, []).append((rank, position, schedule.message_key(part)))
    return out


def _choose(schedule: Schedule) -> dict[int, _Message] | None:
    """rank -> the gradient message that brings it the loss; None if some rank gets none.

    A rank knows the loss from the reader of its chosen message on; each rank takes the
    eligible message (sent after its sender knows) that it reads first. A worklist
    re-examines a rank's receivers whenever it learns the loss earlier.
    """
    holder = schedule.loss_rank
    readers = [_readers(schedule, stream) for stream in schedule.streams]
    incoming = _incoming(schedule)
    receivers = {src: {dst for dst, sends in incoming.items() for s, _, _ in sends if s == src}
                 for src in range(schedule.num_ranks)}
    knows: dict[int, int] = {holder: _last_loss(schedule)}
    chosen: dict[int, _Message] = {}
    work = sorted(receivers[holder])
    while work:
        rank = work.pop()
        if rank == holder:
            continue
        best = min(((readers[rank][message], message) for src, position, message in incoming.get(rank, ())
                    if src in knows and position >= knows[src]), default=None)
        if best is not None and (rank not in knows or best[0] + 1 < knows[rank]):
            knows[rank], chosen[rank] = best[0] + 1, best[1]
            work.extend(receivers[rank])
    return chosen if len(chosen) == schedule.num_ranks - 1 else None


def _marked(op: Instruction, carrying: set[_Message], schedule: Schedule) -> Instruction:
    if isinstance(op, Exchange):
        return Exchange(tuple(_marked(part, carrying, schedule) for part in op.ops))  # type: ignore[misc]
    if isinstance(op, (SendGrad, RecvGrad)):
        loss = schedule.transfers(op) and schedule.message_key(op) in carrying
        return dataclasses.replace(op, loss=loss) if op.loss != loss else op
    return op


def mark_loss_messages(schedule: Schedule) -> Schedule:
    """``schedule`` with the loss-carrying gradient messages marked (any old marks replaced)."""
    chosen = _choose(schedule) if schedule.training and schedule.num_ranks > 1 else None
    carrying = set(chosen.values()) if chosen else set()
    streams = tuple(tuple(_marked(op, carrying, schedule) for op in stream) for stream in schedule.streams)
    return dataclasses.replace(schedule, streams=streams)


def knows_loss_after(schedule: Schedule) -> dict[int, int] | None:
    """rank -> the position in its stream after which it knows the step's loss (the loss
    rank: its last loss; others: the reader of their marked message); None without marks."""
    known = {schedule.loss_rank: _last_loss(schedule)} if schedule.training else {}
    for rank, stream in enumerate(schedule.streams):
        readers = _readers(schedule, stream)
        for op in stream:
            for part in parts(op):
                if isinstance(part, RecvGrad) and part.loss:
                    known[rank] = readers[schedule.message_key(part)] + 1
    return known if len(known) == schedule.num_ranks and schedule.num_ranks > 1 else None


def check_loss_messages(schedule: Schedule) -> None:
    """Marks on moving gradient messages only, sender and receiver agreeing, one into every
    rank but the loss rank (or none at all), each sent after its sender knows the loss."""
    sent, received = {}, {}
    for rank, stream in enumerate(schedule.streams):
        for position, op in enumerate(stream):
            for part in parts(op):
                if not getattr(part, "loss", False):
                    continue
                if not (schedule.training and schedule.transfers(part)):
                    raise _error(schedule, rank, position, part, "only a gradient message that moves can carry "
                                 "the loss (with coalesce: a group's last send or first receive)")
                (sent if isinstance(part, SendGrad) else received)[schedule.message_key(part)] = (rank, position)
    if not sent and not received:
        return
    if set(sent) != set(received):
        message = sorted(set(sent) ^ set(received))[0]
        rank, position = sent.get(message) or received[message]
        raise _error(schedule, rank, position, None, f"message {message} carries the loss on one end only; "
                     "mark the SendGrad and its RecvGrad alike")
    known = knows_loss_after(schedule)
    into = sorted(schedule.rank_of(message[1]) for message in received)
    wanted = sorted(set(range(schedule.num_ranks)) - {schedule.loss_rank})
    if into != wanted or known is None:
        raise ScheduleError(f"{schedule.name}: the loss reaches ranks {into} by message but must reach each of "
                            f"{wanted} exactly once (or no rank, for an all-reduce); rebuild it with "
                            f"pipegrid.schedules.build\n{schedule.table()}")
    for message, (rank, position) in sent.items():
        if position < known[rank]:
            raise _error(schedule, rank, position, None, f"sends the loss on {message} before it knows it "
                         f"(from position {known[rank]} on)")


def _error(schedule: Schedule, rank: int, position: int, op: Instruction | None, message: str) -> ScheduleError:
    return ScheduleError(f"{schedule.name}: rank {rank}, position {position} "
                         f"({op or schedule.streams[rank][position]}): {message}\n{schedule.table()}")
