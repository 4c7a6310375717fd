"""Op costs in a rank's own order (``plan.replay``) and a whole backward's own cost under a
schedule that splits others (``BW``): the arithmetic, on given costs; no timing thresholds."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from pipegrid.pipe.spec import LayerSpec
from pipegrid.plan.model import ChunkCost
from pipegrid.plan.replay import StreamReplay, profile_stream, stream_chunk_costs
from pipegrid.schedules import build, simulate
from pipegrid.schedules.instructions import Backward, BackwardInput, BackwardWeight, Forward
from tests.support.models import ResidualMLP

_KINDS = {Forward: "F", Backward: "BW", BackwardInput: "B", BackwardWeight: "W"}


def _busy_by_count(stream, cost: dict) -> Fraction:
    """A rank's compute time added up op by op from the same costs the simulator is given."""
    return sum((cost[_KINDS[type(op)]] for op in stream if type(op) in _KINDS), Fraction(0))


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (3, 6)])
def test_a_kept_whole_backward_costs_bw_the_split_halves_cost_b_and_w(p: int, m: int) -> None:
    schedule = build("dualpipev", p, m, 2)
    assert any(isinstance(op, Backward) for stream in schedule.streams for op in stream)  # it keeps some whole
    cost = {"F": Fraction(1), "B": Fraction(1), "W": Fraction(3, 2), "BW": Fraction(2)}
    result = simulate(schedule, {**cost, "comm": Fraction(0)})
    for rank, stream in enumerate(schedule.streams):
        assert result.busy[rank] == _busy_by_count(stream, cost)
    per_stage = simulate(schedule, {"F": Fraction(1), "B": Fraction(1), "W": Fraction(3, 2), "comm": Fraction(0)},
                         [cost] * (2 * p))
    assert per_stage.busy == result.busy


def test_without_bw_a_whole_backward_costs_b_plus_w() -> None:
    schedule = build("dualpipev", 2, 4, 2)
    cost = {"F": Fraction(1), "B": Fraction(1), "W": Fraction(3, 2)}
    result = simulate(schedule, {**cost, "comm": Fraction(0)})
    for rank, stream in enumerate(schedule.streams):
        assert result.busy[rank] == _busy_by_count(stream, {**cost, "BW": cost["B"] + cost["W"]})
    # a uniform BW does not reach a stage whose own costs leave it out
    with_stage = simulate(schedule, {**cost, "BW": Fraction(9), "comm": Fraction(0)}, [cost] * 4)
    assert with_stage.busy == result.busy


def test_bw_changes_nothing_where_every_backward_is_split() -> None:
    schedule = build("zb_v", 2, 4, 2)
    cost = {"F": Fraction(1), "B": Fraction(1), "W": Fraction(1), "comm": Fraction(0)}
    assert simulate(schedule, {**cost, "BW": Fraction(7)}).makespan == simulate(schedule, cost).makespan


def test_stream_chunk_costs_arithmetic() -> None:
    costs = stream_chunk_costs({(0, "F"): 1.0, (0, "I"): 0.5, (0, "W"): 1.5,
                                (1, "F"): 2.0, (1, "B"): 3.0,
                                (3, "F"): 1.0, (3, "B"): 2.5, (3, "I"): 1.0, (3, "W"): 1.25})
    assert costs[0] == ChunkCost(forward_s=1.0, backward_s=2.0, input_s=0.5, weight_s=1.5)  # split only: I + W
    assert costs[1] == ChunkCost(forward_s=2.0, backward_s=3.0)  # never split: no halves
    assert costs[3] == ChunkCost(forward_s=1.0, backward_s=2.5, input_s=1.0, weight_s=1.25)  # both kinds
    assert costs[3].stage_costs(split=True) == {"F": 1.0, "B": 1.0, "W": 1.25, "BW": 2.5}


@pytest.mark.parametrize("name,v,rank", [("zb_v", 2, 0), ("zb_v", 2, 1), ("dualpipev", 2, 0), ("1f1b", 1, 1)])
def test_profile_stream_times_every_op_kind_of_each_stage_the_rank_holds(name: str, v: int, rank: int) -> None:
    schedule = build(name, 2, 4, v)
    stages = schedule.stages_of(rank)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    costs = profile_stream(schedule.streams[rank], {s: [LayerSpec(ResidualMLP, 8)] for s in stages},
                           dict.fromkeys(stages, x), last_stage=schedule.num_model_stages - 1,
                           loss_fn=torch.nn.functional.mse_loss, labels=y, repeats=1)
    assert sorted(costs) == sorted(stages)
    for stage, cost in costs.items():
        codes = {op.code for op in schedule.streams[rank] if type(op) in _KINDS and op.stage == stage}
        assert cost.forward_s > 0 and cost.backward_s > 0
        assert (cost.input_s > 0) == ("I" in codes) and (cost.weight_s > 0) == ("W" in codes)


def test_profile_stream_needs_the_layers_of_every_stage_it_runs() -> None:
    schedule = build("zb_v", 2, 4, 2)
    with pytest.raises(ValueError, match=r"stages \[3\].*give the layers of every stage"):
        profile_stream(schedule.streams[0], {0: [LayerSpec(ResidualMLP, 8)]}, {0: torch.randn(3, 8)}, last_stage=3)


def test_stream_replays_alternate_and_record_only_what_they_are_told() -> None:
    """Two schedules' replays built side by side and swept in turn, as plan_vs_measured does."""
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    replays = []
    for name, v in (("zb_h1", 1), ("zb_v", 2)):
        schedule = build(name, 2, 4, v)
        stages = schedule.stages_of(1)
        replays.append(StreamReplay(schedule.streams[1], {s: [LayerSpec(ResidualMLP, 8)] for s in stages},
                                    dict.fromkeys(stages, x), last_stage=schedule.num_model_stages - 1,
                                    loss_fn=torch.nn.functional.mse_loss, labels=y))
    with pytest.raises(RuntimeError, match="no sweep was recorded"):
        replays[0].costs()
    for record in (False, True, True):
        for replay in replays:
            replay.sweep(record=record)
    for replay in replays:
        per_op = {key: len(times) for key, times in replay.seconds.items()}
        assert set(per_op.values()) == {2 * 4}  # two recorded sweeps of 4 micro-batches, each op kind
        assert all(p.grad is not None for ps in replay.params.values() for p in ps)
    assert sorted(replays[1].costs()) == [1, 2]
