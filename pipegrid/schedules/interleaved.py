"""Interleaved 1F1B (Megatron-LM): each rank runs v model chunks, stage s on rank s % p.

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

__all__ = ["compute_order", "check"]


def check(num_stages: int, micro_batches: int, virtual_stages: int) -> None:
    """Refuse what the round-based order cannot run, saying what to change."""
    if virtual_stages > 1 and micro_batches % num_stages != 0:
        suggestion = -(-micro_batches // num_stages) * num_stages
        raise ScheduleError(
            f"interleaved_1f1b needs micro_batches to be a multiple of num_stages "
            f"(micro-batches go through in rounds of {num_stages}), got "
            f"micro_batches={micro_batches}, num_stages={num_stages}; set micro_batches="
            f"{suggestion} (a multiple of {num_stages}) or virtual_stages=1"
        )


def _op_at(step: int, rank: int, p: int, v: int, forward: bool) -> ComputeInstruction:
    """The step-th forward (or backward) of ``rank``: rounds of p micro-batches per chunk."""
    chunk = (step // p) % v
    micro_batch = (step // (p * v)) * p + step % p
    if forward:
        return Forward(chunk * p + rank, micro_batch)
    return Backward((v - 1 - chunk) * p + rank, micro_batch)


def compute_order(
    num_stages: int, micro_batches: int, virtual_stages: int = 1
) -> list[list[ComputeInstruction]]:
    """Compute-only order per rank, phases: warmup, steady (1F1B), cooldown."""
    if virtual_stages == 1:
        return one_f_one_b.compute_order(num_stages, micro_batches)
    check(num_stages, micro_batches, virtual_stages)
    p, v = num_stages, virtual_stages
    total = micro_batches * v
    order: list[list[ComputeInstruction]] = []
    for rank in range(p):
        # Megatron's warmup: fill the other chunks of the first round, plus twice
        # the distance to the last rank so the steady phase never waits on a send.
        warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)
        ops = [_op_at(k, rank, p, v, forward=True) for k in range(warmup)]
        for k in range(warmup, total):  # steady: one F, one B
            ops.append(_op_at(k, rank, p, v, forward=True))
            ops.append(_op_at(k - warmup, rank, p, v, forward=False))
        for k in range(total - warmup, total):  # cooldown
            ops.append(_op_at(k, rank, p, v, forward=False))
        order.append(ops)
    return order
