"""What the cost model charges for messages (a late receive's wake-up, the message count) and
how the planner picks among predictions it cannot tell apart (a tie, said with its reason)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from pipegrid.plan import Candidate, ClusterSpec, DeviceSpec, LayerCost, choose, predict
from pipegrid.plan.choice import with_choice_notes
from pipegrid.plan.predict import messages_per_step
from pipegrid.schedules import build, simulate
from pipegrid.schedules.instructions import is_send, parts

_COSTS = {"F": Fraction(2), "B": Fraction(2), "W": Fraction(2), "comm": Fraction(1, 10)}


def _cpu(wake_s: float = 0.0) -> ClusterSpec:
    device = DeviceSpec(peak_flops=1e11, memory_bytes=8 * 2 ** 30, memory_bandwidth=1e10, wake_s=wake_s)
    return ClusterSpec("cpu_2", 1, 2, device, intra_gbytes_per_s=5.0, inter_gbytes_per_s=5.0)


def _layers(n: int = 8) -> list[LayerCost]:
    return [LayerCost("block", 1000, forward_s=1.0, backward_s=2.0, output_bytes=4096) for _ in range(n)]


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("zb_h1", 1), ("zb_v", 2)])
def test_a_late_receive_waits_for_the_wake_up_and_an_early_one_does_not(name: str, v: int) -> None:
    """Posted after its send, a receive's data comes ``wake`` after the receive (gloo asks the
    sender's progress thread); posted before, ``comm`` after the send, as without a wake cost."""
    wake = {**_COSTS, "wake": Fraction(1)}
    late, early = build(name, 2, 8, v, early_receives=False), build(name, 2, 8, v)
    assert simulate(late, wake).makespan > simulate(late, _COSTS).makespan
    assert simulate(early, wake).makespan < simulate(late, wake).makespan
    assert simulate(early, _COSTS).makespan == simulate(late, _COSTS).makespan  # posting early is free


@pytest.mark.parametrize("name,v,k,expected", [("1f1b", 1, 1, 16), ("zb_h1", 1, 1, 16), ("zb_v", 2, 1, 32),
                                               ("dualpipev", 2, 1, 32), ("interleaved_1f1b", 2, 1, 48),
                                               ("1f1b", 1, 4, 4)])
def test_messages_per_step_counts_what_the_schedule_sends(name: str, v: int, k: int, expected: int) -> None:
    candidate = Candidate(pipe=2, schedule=name, virtual_stages=v, coalesce=k)
    sent = sum(1 for stream in build(name, 2, 8, v, coalesce=k).streams for op in stream for part in parts(op)
               if is_send(part) and part.micro_batch % k == k - 1)
    assert messages_per_step(candidate, 8) == sent == expected


def _predictions(steps: dict[str, float]) -> list:
    out = []
    for name, step in steps.items():
        v = 2 if name in ("zb_v", "dualpipev") else 1
        pred = predict(_layers(), Candidate(pipe=2, schedule=name, virtual_stages=v), _cpu(), micro_batches=8)
        out.append(dataclasses.replace(pred, step_s=step))
    return out


def test_within_the_band_the_pick_has_the_fewest_messages_and_says_why() -> None:
    choice = choose(_predictions({"dualpipev": 0.2315, "zb_v": 0.2348, "zb_h1": 0.2327, "1f1b": 0.256}), 0.03)
    assert choice.pick.candidate.schedule == "zb_h1"
    assert [pr.candidate.schedule for pr in choice.tied] == ["dualpipev", "zb_v"]
    assert choice.reason.startswith("tie: p=2 d=1 t=1 zb_h1 b=1, p=2 d=1 t=1 dualpipev v=2 b=1 and ")
    assert "zb_h1 b=1 preferred: fewer pipeline messages (16 a step against 32" in choice.reason


def test_a_clear_lead_is_picked_and_a_zero_band_is_no_tie() -> None:
    preds = _predictions({"dualpipev": 0.20, "zb_h1": 0.2327})
    choice = choose(preds, 0.03)
    assert choice.pick.candidate.schedule == "dualpipev" and not choice.tied
    assert "predicted fastest" in choice.reason
    assert choose(_predictions({"dualpipev": 0.2315, "zb_h1": 0.2327}), 0.0).pick.candidate.schedule == "dualpipev"
    ranked = with_choice_notes(_predictions({"dualpipev": 0.2315, "zb_h1": 0.2327, "1f1b": 0.3}))
    assert [pr.candidate.schedule for pr in ranked] == ["zb_h1", "dualpipev", "1f1b"]
    assert ranked[0].notes[-1] == ranked[1].notes[-1] and not ranked[2].notes


def test_bad_choices_and_wake_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one prediction"):
        choose([])
    with pytest.raises(ValueError, match="within must be >= 0"):
        choose(_predictions({"zb_h1": 1.0}), -0.1)
    with pytest.raises(ValueError, match="wake_s"):
        DeviceSpec(peak_flops=1e11, memory_bytes=1e9, memory_bandwidth=1e10, wake_s=-1.0)


def test_predict_charges_the_wake_up_to_late_receives_only() -> None:
    pred = predict(_layers(), Candidate(pipe=2, schedule="zb_v", virtual_stages=2), _cpu(wake_s=0.5), micro_batches=8)
    assert pred.costs["wake"] == 0.5 and pred.messages == 32
