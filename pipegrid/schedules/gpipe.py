"""GPipe: all forwards, then all backwards; keeps every micro-batch's activations.

Timeline (p=3, m=4, F=1, B=2)::

    rank 0 | 0F0 0F1 0F2 0F3   ·   ·   ·   ·   ·   · 0B0 0B0 0B1 0B1 0B2 0B2 0B3 0B3
    rank 1 |   · 1F0 1F1 1F2 1F3   ·   ·   · 1B0 1B0 1B1 1B1 1B2 1B2 1B3 1B3   ·   ·
    rank 2 |   ·   · 2F0 2F1 2F2 2F3 2B0 2B0 2B1 2B1 2B2 2B2 2B3 2B3   ·   ·   ·   ·

``1F3`` is model stage 1 forward of micro-batch 3; ``·`` is idle.

Bubble (F=1, B=2): (p-1)/(m+p-1); peak in-flight per stage: m.
"""

from __future__ import annotations

from pipegrid.schedules.instructions import Backward, ComputeInstruction, Forward
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order"]


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Compute-only order per rank: F of every micro-batch, then B in the same order."""
    order: list[list[ComputeInstruction]] = []
    for stage in range(placement.num_ranks):  # one chunk per rank: stage s on rank s
        forwards = [Forward(stage, mb) for mb in range(micro_batches)]
        backwards = [Backward(stage, mb) for mb in range(micro_batches)]
        order.append([*forwards, *backwards])
    return order
