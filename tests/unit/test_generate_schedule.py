"""The generate schedule as data: builds and validates under gloo's and NCCL's rules for many
ranks x micro-batches x new tokens (m < p and m = 1 included), keeps every rank busy once
m >= p, feeds each sampled token back to stage 0, and refuses what it cannot run."""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import pytest

from pipegrid.schedules import Forward, RecvToken, ScheduleError, SendToken, parse_instruction, parts, simulate, validate
from pipegrid.schedules import generate
from pipegrid.schedules.__main__ import main
from pipegrid.schedules.render import to_text

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
