"""Schedules built over groups of micro-batches (``coalesce``): one message per group."""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import pytest

from pipegrid.conf.schema import ScheduleConfig
from pipegrid.schedules import (
    SCHEDULE_NAMES, SCHEDULES, Forward, RecvActivation, ScheduleError, SendActivation, build, is_recv, is_send,
    parts, simulate, validate,
)


def _groups(m: int) -> list[int]:
    return [k for k in range(2, m + 1) if m % k == 0]


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_divisor_builds_validates_and_simulates(name: str) -> None:
    v = (SCHEDULES[name].chunks or (2,))[0]
    for p, m in itertools.product(range(1, 5), range(1, 17)):
        for k in _groups(m):
            if name == "interleaved_1f1b" and (m // k) % p:  # its own words when m itself is off
                with pytest.raises(ScheduleError, match="micro_batches/coalesce" if m % p == 0 else "set micro_batches"):
                    build(name, p, m, v, coalesce=k)
                continue
            if name == "dualpipev" and m // k < 2 * p:
                with pytest.raises(ScheduleError, match=r"micro_batches/coalesce=.* set micro_batches="):
                    build(name, p, m, v, coalesce=k)
                continue
            schedule = build(name, p, m, v, coalesce=k)
            validate(schedule)
            assert simulate(schedule).makespan > 0


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb_h1"])
def test_one_message_per_group_and_direction(name: str) -> None:
    p, m, k = 3, 12, 4
    schedule = build(name, p, m, coalesce=k)
    for rank, stream in enumerate(schedule.streams):
        moving = [part for op in stream for part in parts(op)
                  if (is_send(part) or is_recv(part)) and schedule.transfers(part)]
        directions = (rank > 0) + (rank < p - 1)  # neighbours
        assert len(moving) == 2 * directions * m // k  # each way: activations and gradients
        for op in moving:  # the last send of a group posts it, the first receive takes it
            assert op.micro_batch % k == (k - 1 if is_send(op) else 0)


def test_a_group_computes_back_to_back_in_micro_batch_order() -> None:
    schedule = build("1f1b", 2, 8, coalesce=4)
    forwards = [op.micro_batch for op in schedule.streams[1] if isinstance(op, Forward)]
    assert forwards == list(range(8))
    rank0 = [str(op) for op in schedule.streams[0]]
    assert rank0[:12] == ["0L0", "0F0", "0SA0", "0L1", "0F1", "0SA1", "0L2", "0F2", "0SA2",
                          "0L3", "0F3", "0SA3"]


def test_bubble_is_that_of_the_groups() -> None:
    costs = {"F": Fraction(1), "B": Fraction(2), "W": Fraction(0), "comm": Fraction(0)}
    for p, m, k in [(2, 16, 4), (4, 16, 2), (3, 12, 3)]:
        result = simulate(build("1f1b", p, m, coalesce=k), costs)
        assert result.bubble_fraction == Fraction(p - 1, m // k + p - 1)


def test_groups_win_when_messages_cost_more_than_compute() -> None:
    costs = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 6.0}
    plain = simulate(build("1f1b", 2, 16), costs).makespan
    grouped = simulate(build("1f1b", 2, 16, coalesce=4), costs).makespan
    assert grouped < plain
    cheap = dict(costs, comm=0.0)
    assert simulate(build("1f1b", 2, 16, coalesce=4), cheap).makespan > simulate(build("1f1b", 2, 16), cheap).makespan


@pytest.mark.parametrize("args,match", [
    (("1f1b", 2, 6, 1, 4), "micro_batches=6 is not a multiple of coalesce=4"),
    (("1f1b", 2, 6, 1, 0), "coalesce must be >= 1"),
    (("interleaved_1f1b", 2, 8, 2, 8), r"micro_batches/coalesce to be a multiple of num_ranks=2.*set micro_batches=16"),
])
def test_refused_groupings_say_what_to_change(args: tuple, match: str) -> None:
    name, p, m, v, k = args
    with pytest.raises(ScheduleError, match=match):
        build(name, p, m, v, coalesce=k)


def test_a_group_received_out_of_order_is_caught() -> None:
    good = build("1f1b", 2, 4, coalesce=2, early_receives=False)  # (each receive alone, to move it)
    stream = list(good.streams[1])
    stream.insert(stream.index(RecvActivation(1, 0)), stream.pop(stream.index(RecvActivation(1, 1))))
    streams = (good.streams[0], tuple(stream))
    with pytest.raises(ScheduleError, match="before the first receive of its message group"):
        validate(dataclasses.replace(good, streams=streams))


def test_a_group_posted_before_all_its_parts_is_caught() -> None:
    good = build("gpipe", 2, 4, coalesce=2)
    stream = list(good.streams[0])
    i, j = stream.index(SendActivation(0, 0)), stream.index(SendActivation(0, 1))
    stream.insert(i, stream.pop(j))  # the group's message before micro-batch 0 is even sent
    with pytest.raises(ScheduleError, match="earlier sends of its message group|the forward that produces it"):
        validate(dataclasses.replace(good, streams=(tuple(stream), good.streams[1])))


def test_config_refuses_a_coalesce_that_does_not_divide_micro_batches() -> None:
    with pytest.raises(ValueError, match="schedule.micro_batches=6 must be a multiple of schedule.coalesce=4"):
        ScheduleConfig(micro_batches=6, coalesce=4)
    with pytest.raises(ValueError, match="schedule.coalesce must be an integer >= 1"):
        ScheduleConfig(coalesce=0)
    assert ScheduleConfig(micro_batches=8, coalesce=4).coalesce == 4
