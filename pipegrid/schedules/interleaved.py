"""Interleaved 1F1B (Megatron-LM): each rank runs v model chunks, placed "loop" (stage s on rank s % p).

Timeline (p=2, m=4, v=2, F=1, B=2 per chunk)::

    rank 0 | 0F0 0F1 2F0 2F1 0F2   · 2B0 2B0 0F3 2B1 2B1 2F2 0B0 0B0 2F3 0B1 0B1   · 2B2 2B2   · 2B3 2B3 0B2 0B2 0B3 0B3
    rank 1 |   · 1F0 1F1 3F0 3B0 3B0 3F1 3B1 3B1 1F2 1B0 1B0 1F3 1B1 1B1 3F2 3B2 3B2 3F3 3B3 3B3 1B2 1B2 1B3 1B3   ·   ·

``1F3`` is model stage 1 forward of micro-batch 3; ``·`` is idle.

Micro-batches go through in rounds of p; the bubble shrinks by v:
with per-chunk costs F=1/v, B=2/v it is (p-1)/(v*m + p-1). Needs m % p == 0.
"""

from __future__ import annotations

from pipegrid.schedules import one_f_one_b
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import Backward, ComputeInstruction, Forward
from pipegrid.schedules.placement import Placement

__all__ = ["compute_order", "check"]


def check(num_ranks: int, micro_batches: int, virtual_stages: int, coalesce: int = 1) -> None:
    """Refuse what the round-based order cannot run, saying what to change (coalesce only when set)."""
    p, m, k = num_ranks, micro_batches, coalesce
    if virtual_stages > 1 and m % p != 0:
        suggestion = -(-m // p) * p
        raise ScheduleError(
            f"interleaved_1f1b needs micro_batches to be a multiple of num_ranks "
            f"(micro-batches go through in rounds of {p}), got "
            f"micro_batches={m}, num_ranks={p}; set micro_batches="
            f"{suggestion} (a multiple of {p}) or virtual_stages=1"
        )
    if virtual_stages > 1 and k > 1 and (m // k) % p:
        raise ScheduleError(
            f"interleaved_1f1b with coalesce={k} needs micro_batches/coalesce to be a multiple of num_ranks={p} "
            f"(groups go through in rounds of {p}), got {m}/{k}={m // k}; set micro_batches="
            f"{k * p * -(-(m // k) // p)} or a smaller coalesce")


def _op_at(step: int, stages: list[int], p: int, forward: bool) -> ComputeInstruction:
    """The step-th forward (or backward) of a rank holding ``stages``: rounds of p
    micro-batches per chunk, forwards from the first chunk, backwards from the last."""
    v = len(stages)
    chunk = (step // p) % v
    micro_batch = (step // (p * v)) * p + step % p
    if forward:
        return Forward(stages[chunk], micro_batch)
    return Backward(stages[v - 1 - chunk], micro_batch)


def compute_order(placement: Placement, micro_batches: int) -> list[list[ComputeInstruction]]:
    """Compute-only order per rank, phases: warmup, steady (1F1B), cooldown."""
    if placement.chunks == 1:
        return one_f_one_b.compute_order(placement, micro_batches)
    p, v = placement.num_ranks, placement.chunks
    check(p, micro_batches, v)
    total = micro_batches * v
    order: list[list[ComputeInstruction]] = []
    for rank in range(p):
        stages = placement.stages_of(rank)
        # Megatron's warmup: fill the other chunks of the first round, plus twice
        # the distance to the last rank so the steady phase never waits on a send.
        warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)
        ops = [_op_at(k, stages, p, forward=True) for k in range(warmup)]
        for k in range(warmup, total):  # steady: one F, one B
            ops.append(_op_at(k, stages, p, forward=True))
            ops.append(_op_at(k - warmup, stages, p, forward=False))
        for k in range(total - warmup, total):  # cooldown
            ops.append(_op_at(k, stages, p, forward=False))
        order.append(ops)
    return order
