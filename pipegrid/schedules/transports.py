"""How the two transports run a schedule's sends and receives, as checks that can fail.

gloo: a send never blocks its rank; a receive blocks until its message was sent; each
directed rank pair is a FIFO channel. NCCL (what torch does with ``batch_isend_irecv``
on one communicator): a rank's transfers run one after another in issue order on one
stream; a send completes only when its receive runs on the peer, and the peer's
receive only when the send runs; the members of one group (an ``Exchange``) run
together. A rank's compute waits for the transfer that brings its input, and once per
step every rank meets the others in the reduce/step collectives. Those rules deadlock
where gloo's do not: two ranks that each send before receiving from the other, or a
send queued behind a receive that waits on the send's own receiver.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Instruction, _MicroBatchOp, _RankOp, is_recv, is_send, parts,
)
from pipegrid.schedules.schedule import Schedule

__all__ = ["check_gloo", "check_nccl"]

_Message = tuple[str, int, int]


def _fail(schedule: Schedule, rank: int, position: int, op: Instruction, message: str) -> ScheduleError:
    where = f"rank {rank}, position {position} ({op}"
    if isinstance(op, _MicroBatchOp):
        where += f": stage {op.stage}, micro-batch {op.micro_batch}"
    return ScheduleError(f"{schedule.name}: {where}): {message}\n{schedule.table()}")


def _check_channel_order(schedule: Schedule) -> None:
    """Sends and receives between two ranks are issued in the same order (FIFO matching)."""
    sent: dict[tuple[int, int], list[tuple[_Message, int, Instruction]]] = {}
    for rank, stream in enumerate(schedule.streams):
        for position, op in enumerate(stream):
            for part in parts(op):
                if is_send(part) and schedule.transfers(part):
                    key = (rank, schedule.rank_of(part.peer_stage))  # type: ignore[union-attr]
                    sent.setdefault(key, []).append((schedule.message_key(part), position, part))
    taken = {key: 0 for key in sent}
    for rank, stream in enumerate(schedule.streams):
        received: set[_Message] = set()
        for position, op in enumerate(stream):
            for part in filter(is_recv, parts(op)):
                message = schedule.message_key(part)
                if not schedule.transfers(part):
                    if message not in received:
                        raise _fail(schedule, rank, position, part,
                                    f"receive comes before the first receive of its message group "
                                    f"{list(schedule.message_group(part.micro_batch))}; "  # type: ignore[union-attr]
                                    f"a group's receives must run in micro-batch order")
                    continue
                src = schedule.rank_of(part.peer_stage)  # type: ignore[union-attr]
                channel = sent.get((src, rank), [])
                index = taken.get((src, rank), 0)
                if index >= len(channel):
                    raise _fail(schedule, rank, position, part, f"no send from rank {src} matches this receive")
                if channel[index][0] != message:
                    raise _fail(schedule, rank, position, part,
                                f"receive does not match the next message on the channel from rank "
                                f"{src}: rank {src} sent {channel[index][2]} (position {channel[index][1]}) "
                                f"first; sends and receives between two ranks must be issued in the same order")
                taken[(src, rank)] = index + 1
                received.add(message)


def check_gloo(schedule: Schedule) -> None:
    """Channels in FIFO order, then every rank run: sends and receives are posted where they
    stand and never block; compute waits until the message it reads was sent."""
    _check_channel_order(schedule)
    p = schedule.num_ranks
    sent: set[tuple[int, _Message]] = set()  # (receiving rank, message)
    cursor = [0] * p
    progressed = True
    while progressed:
        progressed = False
        for rank, stream in enumerate(schedule.streams):
            while cursor[rank] < len(stream) and not isinstance(stream[cursor[rank]], _RankOp):
                op = stream[cursor[rank]]
                needed = schedule.reads(op)
                if needed is not None and (rank, needed) not in sent:
                    break
                for part in parts(op):
                    if is_send(part) and schedule.transfers(part):
                        sent.add((schedule.rank_of(part.peer_stage), schedule.message_key(part)))  # type: ignore[union-attr]
                cursor[rank] += 1
                progressed = True
        progressed = _meet(schedule, cursor) or progressed
    blocked = [r for r in range(p) if cursor[r] < len(schedule.streams[r])]
    if blocked:
        waits = "; ".join(f"rank {r} waits at position {cursor[r]} ({schedule.streams[r][cursor[r]]})"
                          for r in blocked)
        rank = blocked[0]
        raise _fail(schedule, rank, cursor[rank], schedule.streams[rank][cursor[rank]],
                    f"deadlock: no rank can progress ({waits})")


def _meet(schedule: Schedule, cursor: list[int]) -> bool:
    """When every rank stands at its next reduce/step instruction, all pass it together."""
    here = [stream[c] if c < len(stream) else None for stream, c in zip(schedule.streams, cursor)]
    if not all(isinstance(op, _RankOp) for op in here):
        return False
    if len({str(op) for op in here}) > 1:
        raise ScheduleError(f"{schedule.name}: ranks meet in different collectives "
                            f"({sorted({str(op) for op in here})}); every rank must run TIED, REDUCE "
                            f"and STEP in one order\n{schedule.table()}")
    for rank in range(len(cursor)):
        cursor[rank] += 1
    return True


@dataclass
class _Member:
    sends: bool
    peer: int
    message: _Message
    done: bool = False


@dataclass
class _Unit:
    """One posted group of transfers (a lone send or receive, or an Exchange)."""

    rank: int
    position: int
    op: Instruction
    members: list[_Member] = field(default_factory=list)


    @property
    def done(self) -> bool:
        return all(m.done for m in self.members)


def _unit(schedule: Schedule, rank: int, position: int, op: Instruction) -> _Unit | None:
    moving = [part for part in parts(op)
              if (is_send(part) or is_recv(part)) and schedule.transfers(part)]
    if not moving:
        return None
    members = [_Member(is_send(part), schedule.rank_of(part.peer_stage),  # type: ignore[union-attr]
                       schedule.message_key(part)) for part in moving]
    return _Unit(rank, position, op, members)


class _NcclRun:
    """The state of every rank while the NCCL rules play a schedule out."""

    def __init__(self, schedule: Schedule, per_pair: bool) -> None:
        self.schedule, self.per_pair = schedule, per_pair
        self.cursor = [0] * schedule.num_ranks
        self.queues: dict[tuple[int, int], deque[_Unit]] = {}
        self.received: set[tuple[int, _Message]] = set()  # (rank, message) whose receive completed

    def _queue(self, rank: int, peer: int) -> deque[_Unit]:
        return self.queues.setdefault((rank, peer if self.per_pair else -1), deque())

    def advance(self, rank: int) -> bool:
        """Move ``rank`` as far as it can go (posting transfers); whether it moved."""
        stream, moved = self.schedule.streams[rank], False
        while self.cursor[rank] < len(stream) and not isinstance(stream[self.cursor[rank]], _RankOp):
            position, op = self.cursor[rank], stream[self.cursor[rank]]
            needed = self.schedule.reads(op)
            if needed is not None and (rank, needed) not in self.received:
                return moved  # compute waits for the transfer that brings what it reads
            unit = _unit(self.schedule, rank, position, op)
            if unit is not None and not self.per_pair:
                self._queue(rank, -1).append(unit)
            for peer in sorted({m.peer for m in unit.members}) if unit and self.per_pair else ():
                # one stream per peer: a group's members for each peer are posted apart
                members = [m for m in unit.members if m.peer == peer]
                self._queue(rank, peer).append(_Unit(rank, position, op, members))
            self.cursor[rank] += 1
            moved = True
        return moved

    def match(self) -> bool:
        """Complete every send whose receive heads the peer's queue; whether any did."""
        progressed = False
        for (rank, _key), queue in list(self.queues.items()):
            if not queue:
                continue
            head = queue[0]
            for member in head.members:
                if member.done or not member.sends:
                    continue
                peer_queue = self.queues.get((member.peer, rank if self.per_pair else -1))
                if not peer_queue:
                    continue
                wanted = next((m for m in peer_queue[0].members
                               if not m.sends and not m.done and m.peer == rank), None)
                if wanted is None:
                    continue
                if wanted.message != member.message:
                    raise _fail(self.schedule, member.peer, peer_queue[0].position, peer_queue[0].op,
                                f"receives {wanted.message} from rank {rank} while rank {rank} sends "
                                f"{member.message} (position {head.position}, {head.op}) first; "
                                f"transfers between two ranks must be issued in the same order")
                member.done = wanted.done = progressed = True
                self.received.add((member.peer, member.message))
        for queue in self.queues.values():
            while queue and queue[0].done:
                queue.popleft()
        return progressed

    def deadlock(self) -> ScheduleError:
        waits = []
        for rank, stream in enumerate(self.schedule.streams):
            if self.cursor[rank] >= len(stream):
                continue
            heads = [str(q[0].op) for (r, _), q in sorted(self.queues.items()) if r == rank and q]
            waits.append(f"rank {rank} at position {self.cursor[rank]} ({stream[self.cursor[rank]]}), "
                         f"its oldest unfinished transfer {', '.join(heads) or 'none'}")
        pending = [u for q in self.queues.values() for u in q]
        rank = next((r for r, s in enumerate(self.schedule.streams) if self.cursor[r] < len(s)),
                    pending[0].rank if pending else 0)
        position = min(self.cursor[rank], len(self.schedule.streams[rank]) - 1)
        return _fail(self.schedule, rank, position, self.schedule.streams[rank][position],
                     "deadlock under NCCL's ordering (a rank's transfers run in issue order and a "
                     "send completes only when its receive runs): " + "; ".join(waits)
                     + ". Post the crossing send and receive together (an Exchange) or reorder them")


def check_nccl(schedule: Schedule, *, per_pair: bool = False) -> None:
    """Play ``schedule`` out under NCCL's rules; raise ScheduleError on a deadlock.

    ``per_pair=False`` (what pipegrid runs: every transfer on one communicator) gives
    each rank one stream for all its transfers; ``per_pair=True`` one stream per peer,
    as torch does for lone ``isend``/``irecv`` on two-rank communicators.
    """
    run = _NcclRun(schedule, per_pair)
    p = schedule.num_ranks
    while True:
        moved = any([run.advance(rank) for rank in range(p)])
        matched = run.match()
        if not (moved or matched or _meet(schedule, run.cursor)):
            break
    finished = all(run.cursor[r] >= len(schedule.streams[r]) for r in range(p))
    if not finished or any(run.queues.values()):
        raise run.deadlock()
