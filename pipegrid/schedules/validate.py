"""``validate``: check all ranks' streams together before anything runs.

Structure (order, counts, loads, matching sends/receives, the loss message), then the streams played out
under each transport's rules (``transports.py``): gloo's (sends never block, FIFO per
directed rank pair) and NCCL's (a rank's transfers in issue order, a send completes
only when its receive runs, an Exchange as one group).
"""

from __future__ import annotations

from collections import Counter

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, Forward, Instruction, LoadMicroBatch,
    OptimizerStep, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads,
    RecvToken, SendActivation, SendGrad, SendToken, Exchange, _MicroBatchOp, _RankOp, is_compute, is_recv,
    is_send, parts,
)
from pipegrid.schedules.loss_message import check_loss_messages
from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.transports import check_gloo, check_nccl

__all__ = ["validate"]

_Key = tuple[str, int, int]
_NAMES = {"G": "B"}  # a missing input gradient is named as the full Backward


def _fail(schedule: Schedule, rank: int, position: int | None, message: str,
          op: Instruction | None = None) -> ScheduleError:
    where = f"rank {rank}"
    if position is not None:
        op = op or schedule.streams[rank][position]
        where += f", position {position} ({op}"
        if isinstance(op, _MicroBatchOp):
            where += f": stage {op.stage}, micro-batch {op.micro_batch}"
        where += ")"
    return ScheduleError(f"{schedule.name}: {where}: {message}\n{schedule.table()}")


def validate(schedule: Schedule) -> None:
    """Raise ``ScheduleError`` pointing at the first problem; return quietly when sound."""
    if len(schedule.streams) != schedule.num_ranks:
        raise ScheduleError(
            f"{schedule.name}: expected one stream per rank ({schedule.num_ranks}), "
            f"got {len(schedule.streams)}; build it with pipegrid.schedules.build")
    for rank in range(schedule.num_ranks):
        _check_rank(schedule, rank)
    check_loss_messages(schedule)
    check_gloo(schedule)
    check_nccl(schedule)


def _requirements(schedule: Schedule, rank: int, op: Instruction) -> list[tuple[_Key, str]]:
    """What must already have run on ``rank`` before ``op``, with the reason.

    ``("G", s, mb)`` stands for the input gradient of (s, mb): a full Backward or a
    BackwardInput, whichever the schedule runs there.
    """
    last, placement = schedule.num_model_stages - 1, schedule.placement
    if not isinstance(op, _MicroBatchOp):
        return []
    s, mb = op.stage, op.micro_batch
    need: list[tuple[_Key, str]] = []
    if isinstance(op, Forward):
        if s in (0, last):
            need.append((("L", s, mb), "its LoadMicroBatch"))
        if s > 0:
            local = placement.same_rank(s - 1, s)
            need.append(((("F", s - 1, mb) if local else ("RA", s, mb)),
                         "the forward of the previous stage" if local else "its RecvActivation"))
        elif schedule.fed_by(mb) is not None:  # generation: the previous token of this micro-batch
            source, local = schedule.fed_by(mb), placement.same_rank(0, last)
            need.append(((("F", last, source) if local else ("RT", last, source)),
                         "the last stage's forward that samples its token" if local else "its RecvToken"))
    elif isinstance(op, SendToken):
        need.append((("F", s, mb), "the forward that samples the token"))
    elif isinstance(op, (Backward, BackwardInput)):
        need.append((("F", s, mb), "its forward"))
        if s < last:
            local = placement.same_rank(s, s + 1)
            need.append(((("G", s + 1, mb) if local else ("RG", s, mb)),
                         "the backward of the next stage" if local else "its RecvGrad"))
    elif isinstance(op, BackwardWeight):
        need.append((("I", s, mb), "its BackwardInput"))
    elif isinstance(op, SendActivation):
        need.append((("F", s, mb), "the forward that produces it"))
    elif isinstance(op, SendGrad):
        need.append((("G", s, mb), "the backward that produces it"))
    if is_send(op) and schedule.transfers(op):  # the group's message takes every part
        need += [((op.code, s, other), "the earlier sends of its message group")
                 for other in schedule.message_group(mb) if other != mb]
    return need


def _exchange_problem(schedule: Schedule, op: Exchange) -> str | None:
    """Why an Exchange's members may not be posted as one group, or None."""
    if not op.ops or not all(is_send(part) or is_recv(part) for part in op.ops):
        return "an Exchange groups sends and receives only"
    if not all(schedule.transfers(part) for part in op.ops):
        return ("every member of an Exchange must move a message (with coalesce: a group's last "
                "send or first receive)")
    return None


def _allowed(schedule: Schedule, rank: int, op: Instruction) -> str | None:
    """Why ``op`` may not appear on ``rank`` at all, or None when it may."""
    last, placement = schedule.num_model_stages - 1, schedule.placement
    if isinstance(op, _RankOp):
        return None if schedule.training else "a forward-only schedule has no reduce or step"
    if not isinstance(op, _MicroBatchOp):
        return f"unknown instruction type {type(op).__name__}"
    s, mb = op.stage, op.micro_batch
    if isinstance(op, (SendToken, RecvToken)):
        return _token_problem(schedule, rank, op)
    if not (0 <= s <= last and placement.rank_of(s) == rank):
        return f"stage {s} does not run on rank {rank} (stages here: {schedule.stages_of(rank)})"
    if not 0 <= mb < schedule.micro_batches:
        return f"micro-batch {mb} is outside [0, {schedule.micro_batches})"
    backward = isinstance(op, (Backward, BackwardInput, BackwardWeight, SendGrad, RecvGrad))
    if backward and not schedule.training:
        return "a forward-only schedule has no backward"
    if isinstance(op, (BackwardInput, BackwardWeight)) and not schedule.split_backward:
        return "this schedule uses a full Backward, not a split one"
    if isinstance(op, LoadMicroBatch) and s not in (0, last):
        return "only the first and last model stages load a micro-batch"
    if isinstance(op, (SendActivation, RecvGrad)) and (s == last or placement.same_rank(s, s + 1)):
        return "no communication: the next stage is absent or on the same rank"
    if isinstance(op, (SendGrad, RecvActivation)) and (s == 0 or placement.same_rank(s - 1, s)):
        return "no communication: the previous stage is absent or on the same rank"
    return None


def _token_problem(schedule: Schedule, rank: int, op: SendToken | RecvToken) -> str | None:
    """Why a token transfer may not appear on ``rank``, or None when it may."""
    last, placement = schedule.num_model_stages - 1, schedule.placement
    if not schedule.feedback:
        return "only a generate schedule (feedback > 0) sends sampled tokens back"
    if op.stage != last:
        return f"a token comes from the last model stage ({last}), not stage {op.stage}"
    if placement.rank_of(schedule.home_stage(op)) != rank:
        return f"runs on rank {placement.rank_of(schedule.home_stage(op))}, not rank {rank}"
    if placement.same_rank(0, last):
        return "no communication: the first and last stages are on the same rank"
    if not 0 <= op.micro_batch < schedule.micro_batches - schedule.feedback:
        return (f"item {op.micro_batch} has no next item to feed (items fed: "
                f"[0, {schedule.micro_batches - schedule.feedback}))")
    return None


def _gradient_key(op: Instruction) -> _Key:
    return ("G", op.stage, op.micro_batch)  # type: ignore[union-attr]


def _key(op: Instruction) -> _Key:
    if isinstance(op, _MicroBatchOp):
        return (op.code, op.stage, op.micro_batch)
    return (op.code, -1, -1)  # type: ignore[union-attr]


def _problem(schedule: Schedule, rank: int, op: Instruction, seen: Counter[_Key],
             position: int, last_compute: int) -> str | None:
    """What is wrong with running ``op`` (a single instruction) after ``seen``, or None."""
    problem = _allowed(schedule, rank, op)
    if problem is None and seen[_key(op)]:
        problem = "appears twice; each instruction runs exactly once per step"
    if problem is None and isinstance(op, (Backward, BackwardInput)) and seen[_gradient_key(op)]:
        problem = "computes an input gradient already computed; run a full Backward or BackwardInput, not both"
    if problem is None and isinstance(op, _RankOp) and position < last_compute:
        problem = f"comes before this rank's last compute (position {last_compute})"
    if problem is None and isinstance(op, OptimizerStep):
        if not (seen[_key(ReduceGrads())] and seen[_key(ReduceTiedGrads())]):
            problem = "the optimizer step must come after TIED and REDUCE"
    for needed, reason in ([] if problem else _requirements(schedule, rank, op)):
        if not seen[needed]:
            return f"runs before {reason} ({needed[1]}{needed[0]}{needed[2]})"
    return problem


def _check_rank(schedule: Schedule, rank: int) -> None:
    seen: Counter[_Key] = Counter()
    stream = schedule.streams[rank]
    last_compute = max((i for i, op in enumerate(stream) if is_compute(op)), default=-1)
    for position, op in enumerate(stream):
        if isinstance(op, Exchange) and _exchange_problem(schedule, op):
            raise _fail(schedule, rank, position, _exchange_problem(schedule, op))
        for part in parts(op):
            problem = _problem(schedule, rank, part, seen, position, last_compute)
            if problem:
                raise _fail(schedule, rank, position, problem, part)
            seen[_key(part)] += 1
            if isinstance(part, (Backward, BackwardInput)):
                seen[_gradient_key(part)] += 1
    missing = [k for k in _expected(schedule, rank) if not seen[k]]
    missing += [("W", s, mb) for code, s, mb in seen if code == "I" and not seen[("W", s, mb)]]
    if missing:
        names = ", ".join(k[0] if k[1] < 0 else f"{k[1]}{_NAMES.get(k[0], k[0])}{k[2]}" for k in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise _fail(schedule, rank, None, f"stream is incomplete, missing {names}{more}")


def _expected(schedule: Schedule, rank: int) -> list[_Key]:
    """Every instruction ``rank`` must run once per step (``G``: B or I; each I's W is checked apart)."""
    last, placement = schedule.num_model_stages - 1, schedule.placement
    keys: list[_Key] = []
    for s in schedule.stages_of(rank):
        before = s > 0 and not placement.same_rank(s - 1, s)
        after = s < last and not placement.same_rank(s, s + 1)
        for mb in range(schedule.micro_batches):
            keys.append(("F", s, mb))
            if s in (0, last):
                keys.append(("L", s, mb))
            if before:
                keys.append(("RA", s, mb))
            if after:
                keys.append(("SA", s, mb))
            fed = mb + schedule.feedback < schedule.micro_batches and schedule.feedback > 0
            if fed and not placement.same_rank(0, last) and s in (0, last):
                keys.append(("RT" if s == 0 else "ST", last, mb))
            if not schedule.training:
                continue
            keys.append(("G", s, mb))
            if after:
                keys.append(("RG", s, mb))
            if before:
                keys.append(("SG", s, mb))
    if schedule.training:
        keys += [("TIED", -1, -1), ("REDUCE", -1, -1), ("STEP", -1, -1)]
    return keys
