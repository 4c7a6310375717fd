"""Step timing through the schedule simulator, extrapolated for long schedules.

``pipegrid.schedules.simulate`` is the one source of truth for timing. A 64-rank schedule
with hundreds of micro-batches has ~10^5 ops, too many to simulate per candidate, but past
m = p (2p for a V) a schedule's makespan grows by the same amount per extra micro-batch
(the steady state), so it is simulated there and p micro-batches later and extended along
that line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pipegrid.schedules import Schedule, build, registry, simulate

__all__ = ["StepSimulation", "simulate_step"]

_DIRECT_OPS = 6000  # simulate directly up to this many compute ops


@dataclass(frozen=True)
class StepSimulation:
    """What the simulator says about one pipeline step (no data-parallel sync)."""

    makespan: float
    """Seconds from the first op to the last."""
    bubble_fraction: float
    """Idle share of the makespan, averaged over ranks."""
    peak_inflight: tuple[int, ...]
    """Micro-batches whose activations each model stage holds at its peak."""
    extrapolated_from: tuple[int, int] | None
    """(m1, m2) simulated when m was too long to simulate directly, else None."""


@lru_cache(maxsize=12)
def _schedule(name: str, p: int, m: int, v: int, k: int) -> Schedule:
    return build(name, p, m, v, coalesce=k)


def simulate_step(name: str, p: int, m: int, v: int, costs: Mapping[str, float],
                  coalesce: int = 1, stage_costs: Sequence[Mapping[str, float]] | None = None) -> StepSimulation:
    """Simulate (or extrapolate) one step of schedule ``name`` with uniform stage ``costs``
    (or, with ``stage_costs``, F, B and W per model stage: one mapping per chunk, p x v).

    Past the schedule's steady size (``PlannerHints.steady`` x p micro-batches: p, or 2p
    for a V) each micro-batch adds the same time, so a long schedule is simulated there and
    p micro-batches later and extended along that line. With ``coalesce`` k the steady
    state repeats per group of k micro-batches: the sizes are counted in groups.
    """
    k, hints = coalesce, registry.get(name).hints
    if stage_costs is not None:
        stage_costs = tuple(stage_costs)
        busy = m * sum(c["F"] + c["B"] + c.get("W", 0.0) for c in stage_costs) / p  # per rank, on average
    else:
        busy = m * v * (costs["F"] + costs["B"] + costs.get("W", 0.0))  # per rank
    m1 = (hints.steady if hints else 1) * p * k
    m2 = m1 + p * k
    if p == 1 or m * v * p <= _DIRECT_OPS or m <= m2:
        result = simulate(_schedule(name, p, m, v, k), costs, stage_costs)
        return StepSimulation(result.makespan, result.bubble_fraction, result.peak_inflight, None)
    first = simulate(_schedule(name, p, m1, v, k), costs, stage_costs)
    second = simulate(_schedule(name, p, m2, v, k), costs, stage_costs)
    slope = (second.makespan - first.makespan) / (m2 - m1)
    makespan = second.makespan + slope * (m - m2)
    # a schedule that holds every micro-batch (GPipe, by its planner hints) holds all m; the rest have settled
    holds_all = hints is not None and hints.held(p, m, v) >= m
    peak = tuple(m if holds_all and n == m2 else n for n in second.peak_inflight)
    bubble = max(0.0, 1.0 - busy / makespan) if makespan > 0 else 0.0
    return StepSimulation(makespan, bubble, peak, (m1, m2))
