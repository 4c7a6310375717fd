"""Cost model per chunk: per-stage costs and the posting cost in the simulator, measured
chunk costs in the planner (what makes zb_v's half-size chunks and the first chunk's
missing input gradient visible to the prediction)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from pipegrid.pipe.spec import LayerSpec
from pipegrid.plan import Candidate, ClusterSpec, DeviceSpec, LayerCost, predict, simulate_step
from pipegrid.plan.model import ChunkCost
from pipegrid.plan.profile import profile_chunks
from pipegrid.schedules import build, simulate
from tests.support.models import ResidualMLP

CPU = DeviceSpec(peak_flops=1e11, memory_bytes=8 * 2 ** 30, memory_bandwidth=1e10)


def _cpu(post_s: float = 0.0) -> ClusterSpec:
    device = DeviceSpec(peak_flops=1e11, memory_bytes=8 * 2 ** 30, memory_bandwidth=1e10, post_s=post_s)
    return ClusterSpec("cpu_2", 1, 2, device, intra_gbytes_per_s=5.0, inter_gbytes_per_s=5.0)


def _layers(n: int = 8) -> list[LayerCost]:
    return [LayerCost("block", 1000, forward_s=1.0, backward_s=2.0, output_bytes=4096) for _ in range(n)]


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("zb_v", 2), ("dualpipev", 2),
                                    ("interleaved_1f1b", 2)])
def test_uniform_stage_costs_equal_one_cost_per_kind(name: str, v: int) -> None:
    costs = {"F": Fraction(1), "B": Fraction(2), "W": Fraction(1), "comm": Fraction(0)}
    for p, m in itertools.product((2, 3), (4, 8)):
        if name in ("zb_v", "dualpipev") and m < 2 * p or name == "interleaved_1f1b" and m % p:
            continue
        schedule = build(name, p, m, v)
        per_stage = [{"F": costs["F"], "B": costs["B"], "W": costs["W"]}] * (p * v)
        assert simulate(schedule, costs, per_stage).makespan == simulate(schedule, costs).makespan


def test_1f1b_paced_by_its_slowest_stage() -> None:
    """Stage 1 slower: the step is stage 0's first forward, m of stage 1's F+B, stage 0's last B."""
    for m in (1, 2, 4, 7):
        stage = [{"F": Fraction(1), "B": Fraction(2)}, {"F": Fraction(2), "B": Fraction(3)}]
        result = simulate(build("1f1b", 2, m), {"F": Fraction(1), "B": Fraction(2), "comm": Fraction(0)}, stage)
        assert result.makespan == 1 + m * 5 + 2, m


def test_post_charges_each_transfer_instruction_on_its_rank() -> None:
    """1F1B, p=2, m=1: F0, post SA0 | F1 B1, post SG0 | B0 (rank 0 posts RG0 while rank 1 computes)."""
    x = Fraction(1, 10)
    costs = {"F": Fraction(1), "B": Fraction(2), "W": Fraction(0), "comm": Fraction(0)}
    result = simulate(build("1f1b", 2, 1), {**costs, "post": x})
    assert result.makespan == 6 + 2 * x
    assert result.busy == simulate(build("1f1b", 2, 1), costs).busy  # posting is not compute
    assert simulate(build("1f1b", 1, 4), {**costs, "post": x}).makespan == 12  # one rank posts nothing


def test_stage_costs_are_checked() -> None:
    schedule = build("zb_v", 2, 4, 2)
    with pytest.raises(ValueError, match="one mapping per model stage"):
        simulate(schedule, None, [{"F": 1.0}] * 2)
    with pytest.raises(ValueError, match="per stage use F, B and W"):
        simulate(schedule, None, [{"comm": 1.0}] * 4)
    with pytest.raises(ValueError, match="post"):
        simulate(schedule, {"posting": 1.0})


def test_chunk_cost_split_and_whole() -> None:
    chunk = ChunkCost(forward_s=1.0, backward_s=2.0, input_s=0.5, weight_s=1.75)
    assert chunk.stage_costs(split=True) == {"F": 1.0, "B": 0.5, "W": 1.75, "BW": 2.0}  # BW: a kept whole one
    assert chunk.stage_costs(split=False, slowdown=2.0) == {"F": 2.0, "B": 4.0, "W": 0.0}


def test_predict_uses_measured_chunks_stage_by_stage() -> None:
    """The first chunk has no input gradient (I ~ 0, W the whole backward), the last adds the loss."""
    chunks = [ChunkCost(1.0, 3.0, 0.0, 3.2), ChunkCost(1.0, 3.0, 1.6, 1.6),
              ChunkCost(1.0, 3.0, 1.6, 1.6), ChunkCost(1.2, 3.2, 1.7, 1.7)]
    pred = predict(_layers(), Candidate(pipe=2, schedule="zb_v", virtual_stages=2), _cpu(post_s=0.01),
                   micro_batches=8, chunk_costs=chunks)
    stage_costs = [c.stage_costs(split=True) for c in chunks]
    expected = simulate(build("zb_v", 2, 8, 2), {**pred.costs}, stage_costs)
    assert pred.pipeline_s == pytest.approx(expected.makespan)
    assert pred.stage_costs == tuple(stage_costs)
    assert pred.costs["post"] == 0.01 and pred.costs["F"] == 1.2  # the bottleneck chunk, the last
    whole = predict(_layers(), Candidate(pipe=2, schedule="1f1b"), _cpu(), micro_batches=8,
                    chunk_costs=[ChunkCost(2.0, 6.0), ChunkCost(2.2, 6.4)])
    assert whole.stage_costs == ({"F": 2.0, "B": 6.0, "W": 0.0}, {"F": 2.2, "B": 6.4, "W": 0.0})
    with pytest.raises(ValueError, match="profile the layers cut into 4 chunks"):
        predict(_layers(), Candidate(pipe=2, schedule="zb_v", virtual_stages=2), _cpu(), micro_batches=8,
                chunk_costs=chunks[:2])


def test_post_s_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="post_s"):
        DeviceSpec(peak_flops=1e11, memory_bytes=1e9, memory_bandwidth=1e10, post_s=-1.0)


def test_extrapolated_step_follows_stage_costs() -> None:
    """Past the direct-simulation size, the line through two simulated sizes is still exact."""
    stage = [{"F": 1.0, "B": 1.0, "W": 2.0}, {"F": 1.5, "B": 1.0, "W": 1.0}, {"F": 1.0, "B": 1.0, "W": 1.0}]
    costs = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.1}
    extended = simulate_step("zb_h1", 3, 2100, 1, costs, stage_costs=stage)
    assert extended.extrapolated_from is not None
    direct = simulate(build("zb_h1", 3, 2100, 1), costs, stage)
    assert extended.makespan == pytest.approx(direct.makespan, rel=1e-9)


def test_profile_chunks_times_each_chunk_as_the_engine_runs_it() -> None:
    layers = [LayerSpec(ResidualMLP, 8) for _ in range(4)]
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    costs = profile_chunks(layers, [1, 2, 1], x, loss_fn=torch.nn.functional.mse_loss, labels=y, repeats=1)
    assert len(costs) == 3
    assert all(c.forward_s > 0 and c.backward_s > 0 and c.weight_s > 0 for c in costs)
    later = profile_chunks(layers[:2], [2], x, repeats=1, input_grad=True)  # a later stage: I computes dX
    assert len(later) == 1 and later[0].input_s > 0
    assert not x.requires_grad  # the caller's input is left alone
    with pytest.raises(ValueError, match="add up to the 4 layers"):
        profile_chunks(layers, [2, 1], x)


def test_trace_simulates_measured_durations_stage_by_stage() -> None:
    """A measured zb_h1 step: stage 0 has no input gradient (I ~ 0, W the whole backward)."""
    from pipegrid.pipe.trace import simulated

    schedule = build("zb_h1", 2, 4)
    durations = {(0, "F"): 1.0, (0, "I"): 0.0, (0, "W"): 3.0, (1, "F"): 1.5, (1, "I"): 1.5, (1, "W"): 1.5}
    events = [(rank, str(op), 0.0, durations[(op.stage, op.code)]) for rank, stream in enumerate(schedule.streams)
              for op in stream if (getattr(op, "stage", None), getattr(op, "code", None)) in durations]
    stage_costs = [{"F": durations[(s, "F")], "B": durations[(s, "I")], "W": durations[(s, "W")]} for s in (0, 1)]
    expected = simulate(schedule, {"F": 1.25, "B": 0.75, "W": 2.25, "comm": 0.0}, stage_costs)
    assert simulated(schedule, events).makespan == pytest.approx(expected.makespan)
