"""The generate schedule as data: builds and validates under gloo's and NCCL's rules for many
ranks x micro-batches x new tokens (m < p and m = 1 included), keeps every rank busy once
m >= p, feeds each sampled token back to stage 0, and refuses what it cannot run."""

from __future__ import annotations

import dataclasses
import itertools
import random
from fractions import Fraction

import pytest

from pipegrid.schedules import (
    Forward,
    RecvToken,
    ScheduleError,
    SendToken,
    generate,
    parse_instruction,
    parts,
    simulate,
    validate,
)
from pipegrid.schedules.__main__ import main
from pipegrid.schedules.render import to_text
from pipegrid.schedules.transports import check_gloo, check_nccl

GRID = list(itertools.product(range(1, 7), range(1, 10), range(1, 5)))
UNIT = {"F": Fraction(1), "B": Fraction(0), "W": Fraction(0), "comm": Fraction(0)}


@pytest.mark.parametrize("p,m,t", GRID)
def test_builds_validates_and_simulates(p: int, m: int, t: int) -> None:
    schedule = generate.build(p, m, t)
    validate(schedule)
    result = simulate(schedule, UNIT)
    assert schedule.micro_batches == m * t and schedule.feedback == m
    # the fill takes p - 1 slots; after it a rank idles only while a token is on its way back
    assert result.makespan == m * t + p - 1 + max(0, p - m) * (t - 1)


@pytest.mark.parametrize("p,m,t", [(2, 2, 3), (3, 3, 4), (4, 8, 2), (3, 5, 3)])
def test_every_rank_busy_after_the_fill_when_m_at_least_p(p: int, m: int, t: int) -> None:
    result = simulate(generate.build(p, m, t), UNIT)
    for rank in range(p):
        assert result.idle[rank] == p - 1  # the fill and drain only, never a decode step


def test_each_token_goes_from_the_last_rank_to_rank_0_once() -> None:
    p, m, t = 3, 4, 3
    schedule = generate.build(p, m, t)
    sent = [part for op in schedule.streams[p - 1] for part in parts(op) if isinstance(part, SendToken)]
    received = [part for op in schedule.streams[0] for part in parts(op) if isinstance(part, RecvToken)]
    assert [op.micro_batch for op in sent] == list(range(m * (t - 1)))  # the last step's tokens stay
    assert sorted(op.micro_batch for op in received) == list(range(m * (t - 1)))
    assert all(not isinstance(part, (SendToken, RecvToken)) for r in range(1, p - 1)
               for op in schedule.streams[r] for part in parts(op))


def test_one_rank_feeds_tokens_in_memory() -> None:
    schedule = generate.build(1, 2, 3)
    validate(schedule)
    assert [str(op) for op in schedule.streams[0] if isinstance(op, Forward)] == [f"0F{w}" for w in range(6)]
    assert not any(isinstance(op, (SendToken, RecvToken)) for op in schedule.streams[0])


def test_token_instructions_round_trip() -> None:
    for op in (SendToken(2, 5), RecvToken(2, 5)):
        assert parse_instruction(str(op)) == op
    assert RecvToken(2, 5).peer_stage == 2 and SendToken(2, 5).peer_stage == 0


def test_a_forward_before_its_token_arrives_is_caught() -> None:
    schedule = generate.build(2, 2, 2)
    stream = [part for op in schedule.streams[0] for part in parts(op)]
    moved = [op for op in stream if not isinstance(op, RecvToken)] + [op for op in stream if isinstance(op, RecvToken)]
    broken = dataclasses.replace(schedule, streams=(tuple(moved), schedule.streams[1]))
    with pytest.raises(ScheduleError, match="runs before its RecvToken"):
        validate(broken)


def test_a_token_on_a_training_schedule_is_refused() -> None:
    schedule = dataclasses.replace(generate.build(2, 2, 2), feedback=0)
    with pytest.raises(ScheduleError, match="only a generate schedule"):
        validate(schedule)


@pytest.mark.parametrize("args,match", [((0, 2, 2), "num_ranks must be >= 1"),
                                        ((2, 0, 2), "micro_batches must be >= 1"),
                                        ((2, 2, 0), "new_tokens must be >= 1")])
def test_bad_sizes_are_refused(args: tuple, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        generate.build(*args)


def test_cli_prints_the_generate_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--ranks", "2", "--micro-batches", "4", "--new-tokens", "3", "--streams"]) == 0
    out = capsys.readouterr().out
    assert "generate: ranks=2 micro_batches=12 virtual_stages=1 feedback=4" in out
    assert "1RT0" in out and "1ST0" in out and "simulated bubble fraction: 0.0769" in out


def test_text_picture_draws_the_decode_steps() -> None:
    text = to_text(generate.build(2, 2, 2))
    assert "rank 1 |   . 1F0 1F1 1F2 1F3" in text


# --- several model stages per rank (interleaved's "loop", zb_v's and dualpipev's "v") ---------------------
CHUNKED = [(p, m, t, v, placement) for p in range(1, 5) for m in range(1, 7) for t in (1, 3) for v in (2, 3)
           for placement in ("loop", "v")]


@pytest.mark.parametrize("p,m,t,v,placement", CHUNKED)
def test_chunked_layouts_build_validate_and_simulate(p: int, m: int, t: int, v: int, placement: str) -> None:
    schedule = generate.build(p, m, t, v, placement)
    validate(schedule)
    result = simulate(schedule, UNIT)
    for rank in range(p):
        forwards = [op for op in schedule.streams[rank] if isinstance(op, Forward)]
        assert sorted((op.stage, op.micro_batch) for op in forwards) == sorted(
            (stage, w) for stage in schedule.stages_of(rank) for w in range(m * t))
    if m >= p and (placement == "loop" or v % 2 == 0):
        # full: after the fill only the chain's drain (at most one pass of p * v stages) idles. (A V with an
        # odd chunk count, which only the inference schedule builds, cannot be packed full: with p=2, m=2, v=3
        # a micro-batch visits ranks 0 1 1 0 0 1, and no turn of it is the other's complement.)
        assert result.makespan - m * t * v <= p * v, (result.makespan, result.idle)


@pytest.mark.parametrize("p,m,v,placement", [(2, 2, 2, "v"), (3, 4, 2, "loop"), (4, 6, 2, "loop"), (3, 5, 4, "v"),
                                              (3, 4, 3, "loop")])
def test_chunked_decode_steps_do_not_accumulate_idle_time(p: int, m: int, v: int, placement: str) -> None:
    """However many new tokens, the idle time stays within one drain: the steady state has no bubble."""
    for t in (4, 8, 16):
        assert simulate(generate.build(p, m, t, v, placement), UNIT).makespan - m * t * v <= p * v


def test_v_placement_walks_down_and_back_and_keeps_the_token_on_rank_0() -> None:
    schedule = generate.build(3, 3, 2, 2, "v")
    assert [schedule.rank_of(s) for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert not any(isinstance(part, (SendToken, RecvToken)) for stream in schedule.streams for op in stream
                   for part in parts(op))
    rank0 = [str(op) for op in schedule.streams[0] if isinstance(op, Forward)]
    assert rank0[:4] == ["0F0", "0F1", "0F2", "5F0"]  # stage 0 of new items between the V's returns


def test_cli_prints_a_chunked_generate_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--ranks", "2", "--micro-batches", "2", "--new-tokens", "2", "--virtual", "2",
                 "--placement", "v", "--streams"]) == 0
    out = capsys.readouterr().out
    assert "virtual_stages=2" in out and "placement=v" in out and "rank 0 | 0F0 0F1   . 3F0" in out


# --- micro-batches that leave early (all their sequences hit EOS) ------------------------------------------
LEAVING = [(p, m, t, v, placement, seed) for p in (1, 2, 3) for m in (1, 2, 4) for t in (2, 4)
           for v, placement in ((1, "loop"), (2, "loop"), (2, "v")) for seed in range(2)]


@pytest.mark.parametrize("p,m,t,v,placement,seed", LEAVING)
def test_the_schedule_without_micro_batches_that_left_still_validates(p, m, t, v, placement, seed) -> None:
    """What the ranks run once micro-batches left: every send still has its receive, in an order
    NCCL and gloo finish, and the forwards of the items after each leaving are gone everywhere."""
    schedule = generate.build(p, m, t, v, placement)
    rng = random.Random(seed * 1000 + p * 100 + m * 10 + t)
    left = {mb: rng.randrange(1, t) * m + mb for mb in range(m) if rng.random() < 0.7}  # a decode item
    pruned = generate.without_left(schedule, left)
    check_gloo(pruned)  # validate's transport half: its structure half wants every item (m * t of them)
    check_nccl(pruned)
    simulate(pruned, UNIT)
    for rank, stream in enumerate(pruned.streams):
        items = {op.micro_batch for op in stream if isinstance(op, Forward)}
        want = {w for w in range(m * t) if w % m not in left or w <= left[w % m]}
        assert items == want, (rank, sorted(items), sorted(want))


def test_a_micro_batch_that_left_sends_no_token_back_for_its_last_item() -> None:
    pruned = generate.without_left(generate.build(2, 2, 3), {1: 3})  # micro-batch 1 left at step 1
    tokens = [part.micro_batch for stream in pruned.streams for op in stream for part in parts(op)
              if isinstance(part, (SendToken, RecvToken))]
    assert 3 not in tokens and 1 in tokens and 5 not in tokens
    assert generate.skipped(Forward(0, 3), 3) is False and generate.skipped(Forward(0, 5), 3) is True
