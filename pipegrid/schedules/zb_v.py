"""ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): zero bubble at
1F1B's activation memory, two chunks per rank placed "v" (rank r: stages r and 2p-1-r).

Timeline (p=2, m=4, F=I=W=1 per chunk; rank 0 holds stages 0 and 3, rank 1 stages 1 and 2)::

    rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3   ·
    rank 1 |   · 1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3

``1F3`` is model stage 1 forward of micro-batch 3, I/W the two halves of its backward;
``·`` is idle. The V puts the first and the last stage on rank 0, so a micro-batch's
backward starts on the rank its forward started on and comes back down the same ranks:
every rank gets a chunk near the loss, and the warm-up is short. Phases per rank r:
2(p-r)-1 forwards of chunk 0; r pairs of forwards (chunk 1, then 0); p-r rounds of
F I W on chunk 1; the steady state F I W on chunk 0 then chunk 1, which holds 2p chunk
activations (1F1B's p whole stages); the cool-down runs the input-gradient halves first
and the deferred weight halves last, into what would be the bubble. With F=I=W each rank
idles only the p-1 slots no schedule avoids (rank p-1 cannot start before p-1 forwards),
once m >= 2p; torch's ``ScheduleZBVZeroBubble`` runs the same order.
"""

from __future__ import annotations

from collections import deque

from pipegrid.schedules.instructions import (
    BackwardInput, BackwardWeight, ComputeInstruction, Forward,
)
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order", "pipeline_seconds"]


class _Rank:
    """One rank's order being written: the next micro-batch of each op kind per chunk."""

    def __init__(self, stages: list[int]) -> None:
        self.stages = stages
        self.ops: list[ComputeInstruction] = []
        self.forwards = [0, 0]
        self.inputs = [0, 0]
        self.deferred: tuple[deque[int], deque[int]] = (deque(), deque())

    def forward(self, chunk: int) -> None:
        self.ops.append(Forward(self.stages[chunk], self.forwards[chunk]))
        self.forwards[chunk] += 1

    def backward_input(self, chunk: int) -> None:
        self.ops.append(BackwardInput(self.stages[chunk], self.inputs[chunk]))
        self.deferred[chunk].append(self.inputs[chunk])
        self.inputs[chunk] += 1

    def weight(self, chunk: int) -> None:
        """The chunk's oldest deferred weight gradient."""
        self.ops.append(BackwardWeight(self.stages[chunk], self.deferred[chunk].popleft()))


def _rank_order(rank: int, p: int, n: int, stages: list[int]) -> list[ComputeInstruction]:
    own = _Rank(stages)
    for _ in range(2 * (p - rank) - 1):  # warm-up: chunk 0 fills the way down the V
        own.forward(0)
    for _ in range(rank):  # chunk 1's first forwards arrive, the down-going ones go on
        own.forward(1)
        own.forward(0)
    for _ in range(p - rank):  # chunk 1 is near the loss: its backwards start here
        own.forward(1)
        own.backward_input(1)
        own.weight(1)
    while own.forwards[1] < own.forwards[0] or own.forwards[0] < n:  # steady: F I W, both chunks
        if own.forwards[0] < n:
            own.forward(0)
        own.backward_input(0)
        own.weight(0)
        own.forward(1)
        own.backward_input(1)
        own.weight(1)
    for _ in range(rank):  # cool-down: input gradients first, they unblock the next rank
        own.backward_input(0)
        own.backward_input(1)
    for _ in range(p - rank):
        own.backward_input(0)
        own.weight(0)
    for chunk in (1, 0):  # the weight halves left fill the drain
        while own.deferred[chunk]:
            own.weight(chunk)
    return own.ops


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Per rank, ZB-V's phases (module docstring). Fewer than 2p-1 micro-batches run the
    order of 2p-1 with the missing micro-batches' ops left out, which keeps it sound: an
    op only ever waits for ops of its own micro-batch and for those before it."""
    p = placement.num_ranks
    n = max(micro_batches, 2 * p - 1)
    return [[op for op in _rank_order(rank, p, n, placement.stages_of(rank)) if op.micro_batch < micro_batches]
            for rank in range(p)]


def pipeline_seconds(p: int, m: int, v: int, f: float, b: float, w: float) -> float:
    """The planner's closed form for one step, F/B(input half)/W per chunk: 2m(F+B+W) of work
    per rank plus a fill and drain of p-1 slots, fitted to the simulator for m >= 2p (within
    one slot): W fills the drain until the input halves outweigh it; F sets it when largest."""
    return 2 * m * (f + b + w) + (p - 1) * max(2 * (b - w), b, f + max(f - b, 0.0))
