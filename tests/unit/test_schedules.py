"""Schedules as data: build/validate/simulate over the grid, exact bubble formulas, broken streams."""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import pytest

from pipegrid.schedules import (
    SCHEDULE_NAMES, SCHEDULES, Backward, BackwardInput, BackwardWeight, Forward, LoadMicroBatch,
    OptimizerStep, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads, Schedule,
    ScheduleError, SendActivation, SendGrad, build, parse_instruction, parts, simulate, validate,
)
from pipegrid.schedules import interleaved, zero_bubble
from pipegrid.schedules.placement import Placement

GRID = list(itertools.product(range(1, 9), range(1, 33), range(1, 5)))


def _exact(f: int, b: int, w: int = 0, *, per: int = 1) -> dict[str, Fraction]:
    return {"F": Fraction(f, per), "B": Fraction(b, per), "W": Fraction(w, per),
            "comm": Fraction(0)}


def _accepted(name: str, p: int, m: int, v: int) -> bool:
    """What each schedule's registry record says it runs, written out once more by hand."""
    if not SCHEDULES[name].accepts_chunks(v):
        return False
    if name == "dualpipev" and m < 2 * p:
        return False
    return not (name == "interleaved_1f1b" and v > 1 and m % p)


def _chunks(name: str) -> int:
    return (SCHEDULES[name].chunks or (2,))[0]


# --- the whole grid ----------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_accepted_combination_builds_and_validates(name: str) -> None:
    for p, m, v in GRID:
        if not _accepted(name, p, m, v):
            with pytest.raises(ScheduleError, match="set "):
                build(name, p, m, v)
            continue
        schedule = build(name, p, m, v)
        validate(schedule)
        assert len(schedule.streams) == p


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_simulator_finds_no_cycle(name: str) -> None:
    # the full grid for small sizes, a sample of the rest (the graph is the slow part)
    sample = [c for c in GRID if (c[0] <= 4 and c[1] <= 12) or (c[1] in (1, 7, 16, 32))]
    for p, m, v in sample:
        if _accepted(name, p, m, v):
            result = simulate(build(name, p, m, v))
            assert result.makespan > 0
            assert all(i >= 0 for i in result.idle)


# --- exact numbers ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_exact(name: str) -> None:
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        result = simulate(build(name, p, m), _exact(1, 2))
        assert result.bubble_fraction == Fraction(p - 1, m + p - 1), (p, m)
        assert result.makespan == 3 * (m + p - 1)


def test_peak_inflight_1f1b_and_gpipe() -> None:
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        assert simulate(build("1f1b", p, m)).peak_inflight == tuple(
            min(m, p - s) for s in range(p))
        assert simulate(build("gpipe", p, m)).peak_inflight == (m,) * p


def test_interleaved_bubble_formula() -> None:
    """F=1/v, B=2/v per chunk: bubble == (p-1)/(v*m + p-1) exactly, for every m % p == 0."""
    for p, v in itertools.product(range(1, 9), range(1, 5)):
        for m in range(p, 33, p):
            result = simulate(build("interleaved_1f1b", p, m, v), _exact(1, 2, per=v))
            assert result.bubble_fraction == Fraction(p - 1, v * m + p - 1), (p, v, m)


def test_zb_h1_has_a_third_of_1f1b_idle_and_same_memory() -> None:
    """F=B=W=1: zb_h1 idles p-1 per rank against 1F1B's 3(p-1) once m >= p."""
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        zb = simulate(build("zb_h1", p, m), _exact(1, 1, 1))
        ref = simulate(build("1f1b", p, m), _exact(1, 1, 1))
        assert zb.peak_inflight == ref.peak_inflight
        assert all(z <= r for z, r in zip(zb.idle, ref.idle))
        if m >= p:
            assert zb.idle == (p - 1,) * p, (p, m)
            assert 3 * zb.idle[0] == ref.idle[0]
            assert zb.bubble_fraction == Fraction(p - 1, 3 * m + p - 1)


def test_zb_h1_uses_split_backward_and_others_do_not() -> None:
    ops = {type(op) for stream in build("zb_h1", 4, 8).streams for op in stream}
    assert {BackwardInput, BackwardWeight} <= ops and Backward not in ops
    ops = {type(op) for stream in build("1f1b", 4, 8).streams for op in stream}
    assert Backward in ops and BackwardInput not in ops
    split = build("1f1b", 3, 5, split_backward=True)
    validate(split)
    assert split.split_backward


def test_inference_is_forward_only() -> None:
    schedule = build("inference", 3, 5)
    kinds = {type(part) for stream in schedule.streams for op in stream for part in parts(op)}
    assert kinds == {LoadMicroBatch, Forward, SendActivation, RecvActivation}
    assert simulate(schedule).peak_inflight == (1, 1, 1)
    chunked = build("inference", 2, 5, 3)  # eval of an interleaved model, any m
    assert [str(op) for op in chunked.streams[1] if isinstance(op, Forward)][:4] == [
        "1F0", "1F1", "3F0", "3F1"]


# --- the stream shape the engine relies on -------------------------------------------

def test_streams_layout_one_f_one_b() -> None:
    schedule = build("1f1b", 2, 2)  # every receive posted as early as the transfer order allows
    assert [str(op) for op in schedule.streams[0]] == [
        "0L0", "0F0", "0SA0", "0L1", "0F1", "0SA1+0RG0+0RG1*", "0B0", "0B1", "TIED", "REDUCE", "STEP"]
    assert [str(op) for op in schedule.streams[1]] == [  # 1RA0 waits for its header; 1RA1 joins it
        "1RA0+1RA1", "1L0", "1F0", "1B0", "1SG0", "1L1", "1F1", "1B1", "1SG1*", "TIED", "REDUCE", "STEP"]
    schedule = build("1f1b", 2, 2, early_receives=False)  # both ranks send, then receive: one group each
    assert [str(op) for op in schedule.streams[0]] == [
        "0L0", "0F0", "0SA0", "0L1", "0F1", "0SA1+0RG0", "0B0", "0RG1*", "0B1",
        "TIED", "REDUCE", "STEP"]  # *: the step's loss comes with the last gradient
    assert [str(op) for op in schedule.streams[1]] == [
        "1RA0", "1L0", "1F0", "1B0", "1RA1+1SG0", "1L1", "1F1", "1B1", "1SG1*",
        "TIED", "REDUCE", "STEP"]


def test_one_rank_has_no_communication() -> None:
    for name, v in [("1f1b", 1), ("gpipe", 1), ("zb_h1", 1), ("interleaved_1f1b", 3), ("zb_v", 2),
                    ("dualpipev", 2)]:
        schedule = build(name, 1, 4, v)
        assert not [op for op in schedule.streams[0]
                    if isinstance(op, (SendActivation, RecvActivation, SendGrad, RecvGrad))]
        loads = [op for op in schedule.streams[0] if isinstance(op, LoadMicroBatch)]
        assert len(loads) == 4 * (1 if v == 1 else 2)


def test_channels_are_fifo_for_two_ranks_interleaved() -> None:
    schedule = build("interleaved_1f1b", 2, 8, 4)
    validate(schedule)  # includes the FIFO execution check
    assert schedule.rank_of(5) == 1 and schedule.stages_of(1) == [1, 3, 5, 7]
    assert schedule.num_model_stages == 8


# --- refusals and broken streams -------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (("1f1b", 0, 4), "num_ranks must be >= 1"),
    (("1f1b", 2, 0), "micro_batches must be >= 1"),
    (("gpipe", 2, 4, 2), "virtual_stages=1 or use a schedule that runs 2 chunks per rank \\('interleaved_1f1b', "
                         "'zb_v', 'dualpipev'\\)"),
    (("zb_v", 2, 4, 1), "zb_v runs 2 model chunks per rank, got virtual_stages=1; set virtual_stages=2 and build "
                        "the PipelineModule with virtual_stages=2, stage_placement='v'"),
    (("dualpipev", 3, 5, 2), "dualpipev needs at least 2 \\* num_ranks = 6 micro-batches .* set micro_batches=6"),
    (("interleaved_1f1b", 4, 6, 2), "set micro_batches=8"),
    (("nope", 2, 4), "choose one of"),
])
def test_refused_combinations_say_what_to_change(args: tuple, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        build(*args)
    assert issubclass(ScheduleError, ValueError)


def test_interleaved_refuses_in_its_own_words_and_names_coalesce_only_when_set() -> None:
    with pytest.raises(ScheduleError) as info:
        build("interleaved_1f1b", 4, 6, 2)
    assert "interleaved_1f1b needs micro_batches to be a multiple of num_ranks" in str(info.value)
    assert "coalesce" not in str(info.value)  # the user never set it
    with pytest.raises(ScheduleError, match=r"with coalesce=2 needs micro_batches/coalesce .* got 12/2=6"):
        build("interleaved_1f1b", 4, 12, 2, coalesce=2)


def _replace(schedule: Schedule, rank: int, stream: list) -> Schedule:
    streams = [_flat(s) for s in schedule.streams]
    streams[rank] = tuple(stream)
    return dataclasses.replace(schedule, streams=tuple(streams))


def _flat(stream: tuple) -> list:
    """A stream with its Exchange groups apart: each instruction on its own (validate takes both)."""
    return [part for op in stream for part in parts(op)]


def test_missing_receive_is_caught() -> None:
    good = build("1f1b", 3, 4)
    stream = [op for op in _flat(good.streams[1]) if op != RecvActivation(1, 2)]
    with pytest.raises(ScheduleError, match=r"rank 1, position \d+ \(1F2: stage 1, "
                       r"micro-batch 2\): runs before its RecvActivation") as info:
        validate(_replace(good, 1, stream))
    assert "rank 2 |" in str(info.value)  # the table is printed


def test_backward_before_forward_is_caught() -> None:
    good = build("gpipe", 2, 2)
    stream = _flat(good.streams[1])
    i, j = stream.index(Forward(1, 0)), stream.index(Backward(1, 0))
    stream[i], stream[j] = stream[j], stream[i]
    with pytest.raises(ScheduleError, match=r"rank 1.*1B0.*before its forward"):
        validate(_replace(good, 1, stream))


def test_swapped_order_that_deadlocks_is_caught() -> None:
    good = build("gpipe", 2, 2)
    stream = _flat(good.streams[0])
    # rank 0 waits for the grad of mb 0 before sending mb 1's activation that rank 1 needs first
    a = stream.index(SendActivation(0, 1))
    moved = stream[a - 2:a + 1]  # 0L1 0F1 0SA1
    del stream[a - 2:a + 1]
    b = stream.index(Backward(0, 0))
    stream[b + 1:b + 1] = moved
    broken = _replace(good, 0, stream)
    with pytest.raises(ScheduleError, match="deadlock: no rank can progress"):
        validate(broken)
    with pytest.raises(ScheduleError, match="dependency cycle"):
        simulate(broken)


def test_mismatched_channel_order_is_caught() -> None:
    good = build("gpipe", 2, 3)
    stream = _flat(good.streams[1])
    stream.remove(RecvActivation(1, 1))
    stream.insert(stream.index(RecvActivation(1, 0)), RecvActivation(1, 1))  # 1RA1 1RA0 1F0
    with pytest.raises(ScheduleError, match=r"rank 1, position 0 \(1RA1.*does not match "
                       r"the next message on the channel from rank 0: rank 0 sent 0SA0"):
        validate(_replace(good, 1, stream))


def test_missing_step_and_duplicates_are_caught() -> None:
    good = build("1f1b", 2, 2)
    with pytest.raises(ScheduleError, match="incomplete, missing STEP"):
        validate(_replace(good, 0, [op for op in good.streams[0] if op != OptimizerStep()]))
    with pytest.raises(ScheduleError, match="appears twice"):
        validate(_replace(good, 0, [*good.streams[0][:-3], Backward(0, 1), ReduceTiedGrads(),
                                    ReduceGrads(), OptimizerStep()]))
    with pytest.raises(ScheduleError, match="does not run on rank"):
        validate(_replace(good, 0, [Forward(1, 0), *good.streams[0]]))


# --- text form ----------------------------------------------------------------------------

def test_every_instruction_round_trips() -> None:
    samples = [LoadMicroBatch(0, 3), Forward(1, 3), Backward(2, 0), BackwardInput(3, 11),
               BackwardWeight(10, 2), SendActivation(1, 3), RecvActivation(2, 3),
               SendGrad(2, 3), RecvGrad(1, 3), ReduceTiedGrads(), ReduceGrads(),
               OptimizerStep()]
    assert [str(op) for op in samples] == [
        "0L3", "1F3", "2B0", "3I11", "10W2", "1SA3", "2RA3", "2SG3", "1RG3",
        "TIED", "REDUCE", "STEP"]
    for op in samples:
        assert parse_instruction(str(op)) == op
    for name in SCHEDULE_NAMES:
        for stream in build(name, 2, 4, _chunks(name)).streams:
            assert [parse_instruction(str(op)) for op in stream] == list(stream)
    assert parse_instruction("2SG3*") == SendGrad(2, 3, loss=True) != SendGrad(2, 3)
    with pytest.raises(ScheduleError, match="cannot parse"):
        parse_instruction("1F3*")  # only a gradient message carries the loss
    assert SendActivation(1, 3).peer_stage == 2 and RecvActivation(2, 3).peer_stage == 1
    assert SendGrad(2, 3).peer_stage == 1 and RecvGrad(1, 3).peer_stage == 2
    with pytest.raises(ScheduleError, match="cannot parse"):
        parse_instruction("1X3")


def test_zero_bubble_and_interleaved_modules_are_pure_orders() -> None:
    order = zero_bubble.compute_order(Placement("loop", 3), 4)
    assert all(isinstance(op, (Forward, BackwardInput, BackwardWeight)) for ops in order
               for op in ops)
    with pytest.raises(ScheduleError):
        interleaved.check(3, 4, 2)
