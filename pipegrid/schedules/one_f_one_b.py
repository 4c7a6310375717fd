"""1F1B (PipeDream-flush): warm up with forwards, then alternate one forward, one backward.

Timeline (p=3, m=4, F=1, B=2)::

    rank 0 | 0F0 0F1 0F2   ·   ·   ·   · 0B0 0B0 0F3 0B1 0B1   · 0B2 0B2   · 0B3 0B3
    rank 1 |   · 1F0 1F1   ·   · 1B0 1B0 1F2 1B1 1B1 1F3 1B2 1B2   · 1B3 1B3   ·   ·
    rank 2 |   ·   · 2F0 2B0 2B0 2F1 2B1 2B1 2F2 2B2 2B2 2F3 2B3 2B3   ·   ·   ·   ·

``1F3`` is model stage 1 forward of micro-batch 3; ``·`` is idle.

Bubble (F=1, B=2): (p-1)/(m+p-1), as GPipe; peak in-flight at stage s: min(m, p-s).
"""

from __future__ import annotations

from pipegrid.schedules.instructions import Backward, ComputeInstruction, Forward
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order"]


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Compute-only order per rank, phases: warmup, steady (1F1B), cooldown."""
    order: list[list[ComputeInstruction]] = []
    for stage in range(placement.num_ranks):  # one chunk per rank: stage s on rank s
        # Stage s must cover the p-1-s forwards still ahead of it before the
        # first gradient can come back; more would only hold more activations.
        warmup = min(placement.num_ranks - 1 - stage, micro_batches)
        ops: list[ComputeInstruction] = [Forward(stage, mb) for mb in range(warmup)]
        for mb in range(warmup, micro_batches):  # steady: one F, one B
            ops.append(Forward(stage, mb))
            ops.append(Backward(stage, mb - warmup))
        for mb in range(micro_batches - warmup, micro_batches):  # cooldown
            ops.append(Backward(stage, mb))
        order.append(ops)
    return order
