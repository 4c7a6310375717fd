"""DualPipeV (DeepSeek, github.com/deepseek-ai/DualPipe; torch's ``ScheduleDualPipeV``):
two chunks per rank placed "v", forward of one chunk paired with backward of the other.

Timeline (p=2, m=4, F=I=W=1 per chunk, a full backward B=2; rank 0 holds stages 0 and 3)::

    rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3B1 3F2 0B0 0B0 3B2 3B2 3F3   · 0B1 0B1 3B3 3B3 0I2 0W2 0I3 0W3
    rank 1 |   · 1F0 2F0 1F1 2F1 1F2 2B0 2B0 2F2 1B0 1B0 1F3 2B1 2B1 2F3 1B1 1B1 2B2 2B2 1B2 1B2 2I3 1I3 2W3 1W3

``1F3`` is model stage 1 forward of micro-batch 3; B a full backward, I/W its halves; ``·``
is idle. (``python -m pipegrid.schedules dualpipev --ranks 4 --micro-batches 8`` prints more.)

Phases per rank r (p ranks, m micro-batches, chunk 0 = stage r, chunk 1 = stage 2p-1-r):
fill chunk 0 with 2(p-1-r) forwards; r+1 forward pairs of both chunks; p-1-r rounds of
zero-bubble I/W/F on chunk 1; the steady state, m-2p+r+1 rounds of (F0 with B1) then (F1
with B0); p-1-r rounds of B1 then (F1 with B0); r+1 rounds of backwards of both chunks,
switching to split backwards halfway; p-1-r more backwards of chunk 0 with a deferred W
before each; the W's left. DeepSeek's DualPipe overlaps each (F, B) pair of two
micro-batches on one GPU (one's communication under the other's compute); pipegrid, like
torch, runs the pair's forward and then its backward, one after the other. Needs m >= 2p.
"""

from __future__ import annotations

from collections import deque

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Forward,
)
from pipegrid.schedules.placement import Placement

__all__ = ["check", "compute_order", "pipeline_seconds"]


class _Rank:
    """One rank's order being written: the next micro-batch of each op kind per chunk."""

    def __init__(self, stages: list[int]) -> None:
        self.stages = stages
        self.ops: list[ComputeInstruction] = []
        self.forwards = [0, 0]
        self.backwards = [0, 0]  # full or input-gradient: one count
        self.deferred: deque[BackwardWeight] = deque()

    def forward(self, chunk: int) -> None:
        self.ops.append(Forward(self.stages[chunk], self.forwards[chunk]))
        self.forwards[chunk] += 1

    def backward(self, chunk: int, split: bool = False) -> None:
        """A full backward, or (``split``) its input half with the weight half deferred."""
        stage, micro_batch = self.stages[chunk], self.backwards[chunk]
        self.backwards[chunk] += 1
        if split:
            self.ops.append(BackwardInput(stage, micro_batch))
            self.deferred.append(BackwardWeight(stage, micro_batch))
        else:
            self.ops.append(Backward(stage, micro_batch))

    def weight(self) -> None:
        """The oldest deferred weight gradient, if any."""
        if self.deferred:
            self.ops.append(self.deferred.popleft())


def _rank_order(rank: int, p: int, m: int, stages: list[int]) -> list[ComputeInstruction]:
    own = _Rank(stages)
    for _ in range(2 * (p - 1 - rank)):  # fill: chunk 0 only
        own.forward(0)
    for _ in range(rank + 1):  # both chunks
        own.forward(0)
        own.forward(1)
    for _ in range(p - 1 - rank):  # zero-bubble on chunk 1: I, W, F
        own.backward(1, split=True)
        own.weight()
        own.forward(1)
    for _ in range(m - 2 * p + rank + 1):  # steady: (F0, B1) then (F1, B0)
        own.forward(0)  # (the last rank's first pair runs apart in DualPipeV: alike here)
        own.backward(1)
        own.forward(1)
        own.backward(0)
    for _ in range(p - 1 - rank):  # chunk 0's forwards are done: B1, then (F1, B0)
        own.backward(1)
        own.forward(1)
        own.backward(0)
    split = False
    for i in range(rank + 1):  # drain both chunks; the second half splits, to fill with W
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        own.backward(1, split)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        own.backward(0, split)
    for _ in range(p - 1 - rank):  # chunk 0's last backwards, a deferred W before each
        own.weight()
        own.backward(0, split)
    while own.deferred:
        own.weight()
    return own.ops


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Per rank, DualPipeV's phases (see the module docstring); needs m >= 2p (the registry checks)."""
    p = placement.num_ranks
    return [_rank_order(rank, p, micro_batches, placement.stages_of(rank)) for rank in range(p)]


def check(p: int, m: int, v: int, k: int) -> None:
    """Refuse fewer micro-batches (or coalesced groups) than model stages, saying what to set."""
    if m // k < 2 * p:
        groups = f" (micro_batches/coalesce={m}/{k}={m // k})" if k > 1 else ""
        raise ScheduleError(
            f"dualpipev needs at least 2 * num_ranks = {2 * p} micro-batches (one per model stage){groups}, got "
            f"micro_batches={m}; set micro_batches={2 * p * k} or more, or use schedule 'zb_v'")


def pipeline_seconds(p: int, m: int, v: int, f: float, b: float, w: float) -> float:
    """The planner's closed form for one step (F/B(input half)/W per chunk), fitted to the
    simulator for m >= 2p: the drain's full backwards leave F+B-W per rank, more when B > F."""
    return 2 * m * (f + b + w) + (p - 1) * (f + b - w + max(b - f, 0.0))
