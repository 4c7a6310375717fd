"""Inference: forward only, micro-batches streamed through the stages in order.

Timeline (p=3, m=4, F=1)::

    rank 0 | 0F0 0F1 0F2 0F3   ·   ·
    rank 1 |   · 1F0 1F1 1F2 1F3   ·
    rank 2 |   ·   · 2F0 2F1 2F2 2F3

``1F3`` is model stage 1 forward of micro-batch 3; ``·`` is idle.

No backward, no gradient reduce, no optimizer step; a stage holds one micro-batch at a time.
Accepts any virtual_stages and placement (so eval matches the training layout) and any m.
"""

from __future__ import annotations

from pipegrid.schedules.instructions import ComputeInstruction, Forward
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order"]


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Compute-only order per rank: rounds of p micro-batches, chunk by chunk.

    With v=1 this is simply every micro-batch in order. With v chunks (eval of an
    interleaved model) each round goes through chunk 0, then chunk 1, ...; every
    forward depends only on ops earlier in the same order, so it cannot deadlock.
    """
    p = placement.num_ranks
    order: list[list[ComputeInstruction]] = []
    for rank in range(p):
        ops: list[ComputeInstruction] = []
        for first in range(0, micro_batches, p):
            for stage in placement.stages_of(rank):  # chunk by chunk: stages in model order
                ops += [Forward(stage, mb) for mb in range(first, min(first + p, micro_batches))]
        order.append(ops)
    return order
