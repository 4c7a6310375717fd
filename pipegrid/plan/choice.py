"""The planner's pick among predictions, saying so when the cost model cannot tell them apart.

Predictions within ``within`` (a fraction, ``TIE_WITHIN`` by default) of the fastest are a tie:
the cost model misses measured steps by a few per cent, and by different amounts for different
schedules (``benchmarks/plan_vs_measured.py``), so a lead smaller than that is no lead. Among
tied candidates the planner prefers, in order, fewer point-to-point messages per step (each
pays a post, and on CPU gloo may wait for a wake-up that a profile does not see), then less
peak memory, then the faster prediction; it says which it took and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipegrid.plan.predict import Prediction

__all__ = ["Choice", "choose", "with_choice_notes", "TIE_WITHIN"]

TIE_WITHIN = 0.06
"""Default tie band: how far apart the cost model's errors on two schedules have been measured
(``benchmarks/plan_vs_measured.py`` on a quiet 2-core CPU: -6%..0% on 2026-12-04, -4%..+5% and
-12%..0% on 2026-12-05; the GPU side reproduces Megatron-LM's published HFU within +4-8%), so a
smaller lead says nothing about which of two schedules runs faster."""


@dataclass(frozen=True)
class Choice:
    """What the planner proposes and how sure it is."""

    pick: Prediction
    """The proposal: the fastest prediction, or among a tie the preferred one."""
    tied: tuple[Prediction, ...]
    """Other predictions within ``within`` of the fastest (empty: a clear pick)."""
    within: float
    """The tie band, as a fraction of the fastest prediction."""
    reason: str
    """One sentence: the pick, and if tied, with what and why this one."""


def _preference(pr: Prediction) -> tuple[int, int, float]:
    return pr.messages, pr.peak_memory_bytes, pr.step_s


def choose(predictions: Sequence[Prediction], within: float = TIE_WITHIN) -> Choice:
    """The pick among ``predictions`` (module docstring); ``within`` < 0 is refused."""
    if not predictions:
        raise ValueError("choose() needs at least one prediction; widen the search space")
    if within < 0:
        raise ValueError(f"within must be >= 0 (a fraction of the fastest step), got {within}")
    fastest = min(predictions, key=lambda pr: pr.step_s)
    band = [pr for pr in predictions if pr.step_s <= fastest.step_s * (1 + within)]
    pick = min(band, key=_preference)
    tied = tuple(pr for pr in sorted(band, key=lambda pr: pr.step_s) if pr is not pick)
    return Choice(pick, tied, within, _reason(pick, tied, fastest, within))


def _reason(pick: Prediction, tied: Sequence[Prediction], fastest: Prediction, within: float) -> str:
    name = pick.candidate.label()
    if not tied:
        return f"{name}: predicted fastest ({_time(pick.step_s)}/step), no other within {within:.0%}"
    steps = [pr.step_s for pr in (pick, *tied)]
    names = [name, *(pr.candidate.label() for pr in tied)]
    if len(names) > 4:  # a long tie: the nearest few by name
        names = [*names[:3], f"{len(names) - 3} more"]
    head = (f"tie: {', '.join(names[:-1])} and {names[-1]} are predicted within "
            f"{within:.0%} of each other ({_time(min(steps))}-{_time(max(steps))}/step), inside the "
            f"cost model's error; {name} preferred")
    other = fastest if fastest is not pick else tied[0]
    if pick.messages < other.messages:
        why = (f"fewer pipeline messages ({pick.messages} a step against {other.messages} for "
               f"{other.candidate.label()})")
    elif pick.peak_memory_bytes < other.peak_memory_bytes:
        why = (f"less memory ({pick.peak_memory_bytes / 2 ** 20:.0f} MiB against "
               f"{other.peak_memory_bytes / 2 ** 20:.0f} MiB for {other.candidate.label()})")
    else:
        why = "the fastest prediction at equal messages and memory"
    return f"{head}: {why}"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def with_choice_notes(predictions: Sequence[Prediction], within: float = TIE_WITHIN) -> list[Prediction]:
    """``predictions`` with the pick first and, on a tie, the reason in each tied one's notes."""
    if not predictions:
        return []
    choice = choose(predictions, within)
    rest = sorted((pr for pr in predictions if pr is not choice.pick), key=lambda pr: pr.step_s)
    if not choice.tied:
        return [choice.pick, *rest]
    tied = {id(pr) for pr in choice.tied}
    note = (choice.reason,)
    return [replace(choice.pick, notes=(*choice.pick.notes, *note)),
            *[replace(pr, notes=(*pr.notes, *note)) if id(pr) in tied else pr for pr in rest]]
