"""Zero-bubble H1 (Qi et al. 2023): 1F1B with backward split into I (input) and W (weight grad).

Timeline (p=3, m=4, F=I=W=1)::

    rank 0 | 0F0 0F1 0F2   ·   · 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3
    rank 1 |   · 1F0 1F1   · 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3
    rank 2 |   ·   · 2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3

``1F3`` is model stage 1 forward of micro-batch 3; ``·`` is idle.

I unblocks the previous stage at once; W waits and fills what would be bubbles.
F/I follow 1F1B exactly, so peak in-flight is 1F1B's; with F=I=W=1 the bubble is
a third of 1F1B's in time once m >= p: p-1 idle slots per rank instead of 3(p-1),
i.e. a bubble fraction of (p-1)/(3m+p-1) against 1F1B's (p-1)/(m+p-1).
"""

from __future__ import annotations

from pipegrid.schedules import one_f_one_b
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Forward,
)
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order"]


def _split(order: list[ComputeInstruction]) -> list[ComputeInstruction]:
    """1F1B's F/B order with every B replaced by its input-gradient half."""
    return [BackwardInput(op.stage, op.micro_batch) if isinstance(op, Backward) else op
            for op in order]


def _ready(op: ComputeInstruction, done: dict[tuple[str, int, int], int], now: int,
           last: int) -> bool:
    """Whether ``op``'s cross-stage input was finished by time ``now`` (zero latency)."""
    if isinstance(op, Forward):
        return op.stage == 0 or done.get(("F", op.stage - 1, op.micro_batch), now + 1) <= now
    if op.stage == last:
        return True
    return done.get(("I", op.stage + 1, op.micro_batch), now + 1) <= now


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Place each W by a unit-cost (F=I=W=1) list schedule of all ranks at once.

    A rank runs its next F/I (1F1B order) when its input is there; otherwise it
    runs a deferred W. At most ``s`` W's may wait at stage s: stage 0 runs each W
    right after its I, while later stages, whose I's are on the critical path back
    to stage 0, keep more W's for the cooldown. With F=I=W=1 this leaves each rank
    exactly p-1 idle slots (1F1B: 3(p-1)).
    """
    p, last = placement.num_ranks, placement.num_ranks - 1
    main = [_split(ops) for ops in one_f_one_b.compute_order(placement, micro_batches)]
    order: list[list[ComputeInstruction]] = [[] for _ in range(p)]
    pending: list[list[BackwardWeight]] = [[] for _ in range(p)]
    cursor = [0] * p
    done: dict[tuple[str, int, int], int] = {}
    now = 0
    while any(cursor[s] < len(main[s]) or pending[s] for s in range(p)):
        for stage in range(p):
            op = _next_op(stage, main[stage], cursor, pending[stage], done, now, p, last)
            if op is None:
                continue
            order[stage].append(op)
            if isinstance(op, BackwardInput):
                pending[stage].append(BackwardWeight(op.stage, op.micro_batch))
            done[(op.code, op.stage, op.micro_batch)] = now + 1
        now += 1
    return order


def _next_op(stage: int, main: list[ComputeInstruction], cursor: list[int],
             pending: list[BackwardWeight], done: dict[tuple[str, int, int], int], now: int, p: int,
             last: int) -> ComputeInstruction | None:
    """What ``stage`` starts at time ``now``, or None to stay idle for one slot."""
    if len(pending) > stage:
        return pending.pop(0)
    if cursor[stage] < len(main) and _ready(main[cursor[stage]], done, now, last):
        cursor[stage] += 1
        return main[cursor[stage] - 1]
    if pending:
        return pending.pop(0)
    return None
