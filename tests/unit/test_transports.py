"""NCCL ordering, proved: every lowered schedule plays out under NCCL's rules (a rank's
transfers in issue order, a send done only when its receive runs, a group as one) and
gloo's, and a crossed order is caught."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from pipegrid.schedules import (
    SCHEDULE_NAMES, SCHEDULES, Exchange, Forward, RecvActivation, RecvGrad, ScheduleError, SendActivation, SendGrad,
    build, parse_instruction, simulate, validate,
)
from pipegrid.schedules.fusion import order_transfers
from pipegrid.schedules.instructions import is_compute, is_recv, is_send, parts
from pipegrid.schedules.transports import check_gloo, check_nccl


def _naive(schedule):
    """``schedule`` as lowering leaves it before ordering: every receive alone, just before its
    reader, every send alone just after its producer (what a hand-written loop would do)."""
    streams = []
    for stream in schedule.streams:
        flat = [part for op in stream for part in parts(op)]
        receives = {schedule.message_key(op): op for op in flat if is_recv(op)}
        out = []
        for op in flat:
            if is_recv(op):
                continue
            message = schedule.reads(op)
            if message in receives:
                out.append(receives.pop(message))
            out.append(op)
        streams.append(tuple(out))
    return dataclasses.replace(schedule, streams=tuple(streams))


def _accepted(name: str, p: int, m: int, v: int, k: int):
    try:
        return build(name, p, m, v, coalesce=k)
    except ScheduleError:
        return None


def _cases():
    """Every schedule at p <= 6 (placed as it runs: zb_v and dualpipev in a V), inference
    in either placement."""
    for name in SCHEDULE_NAMES:
        virtuals = SCHEDULES[name].chunks or (1, 2, 3)
        for p, m, v, k in itertools.product(range(1, 7), (1, 2, 3, 4, 5, 8), virtuals, (1, 2, 4)):
            schedule = _accepted(name, p, m, v, k)
            if schedule is not None:
                yield pytest.param(schedule, id=f"{name}-p{p}-m{m}-v{v}-k{k}")


@pytest.mark.parametrize("schedule", list(_cases()))
def test_every_lowered_schedule_is_deadlock_free_under_both_transports(schedule):
    validate(schedule)  # build() orders transfers: structure, gloo's FIFO channels, NCCL per rank
    check_nccl(schedule, per_pair=True)  # and with one stream per peer, as torch's lone isend/irecv
    assert order_transfers(schedule) == schedule  # the pass is idempotent
    for before, after in zip(_naive(schedule).streams, schedule.streams):  # compute order untouched
        assert [op for op in before if is_compute(op)] == [op for op in after if is_compute(op)]


def test_both_ranks_sending_first_deadlocks_under_nccl_but_not_gloo():
    # rank 0: F2 SA2 RG1; rank 1: I1 SG1 W0 RA2: both send first
    raw = _naive(build("zb_h1", 2, 3, early_receives=False))
    check_gloo(raw)  # gloo: sends never block
    with pytest.raises(ScheduleError, match=r"deadlock under NCCL's ordering .*rank 0 .*oldest unfinished "
                                            r"transfer 0SA\d; rank 1 .*oldest unfinished transfer 1SG\d"):
        check_nccl(raw)
    fixed = order_transfers(raw)  # gradient 1 is ready before activation 2: rank 0 posts its receive first
    assert Exchange((RecvGrad(0, 1), SendActivation(0, 2))) in fixed.streams[0]
    check_nccl(fixed)


def test_a_ring_of_ranks_each_sending_on_first_is_caught_and_ordered():
    raw = _naive(build("inference", 3, 3, 2))  # 0 -> 1 -> 2 -> 0 (stage 2 feeds stage 3 on rank 0)
    with pytest.raises(ScheduleError, match="deadlock under NCCL's ordering"):
        check_nccl(raw)
    check_nccl(raw, per_pair=True)  # one stream per peer breaks this ring: one stream per rank does not
    check_nccl(order_transfers(raw))


def test_groups_split_into_sends_then_receives_are_caught():
    good = build("1f1b", 2, 4, early_receives=False)  # (early, each group's sends already come first)
    check_nccl(good)
    split = tuple(tuple(part for op in stream for part in sorted(parts(op), key=lambda part: not is_send(part)))
                  for stream in good.streams)  # every group apart, its sends first: both ranks send first
    crossed = dataclasses.replace(good, streams=split)
    check_gloo(crossed)
    with pytest.raises(ScheduleError, match="deadlock under NCCL's ordering"):
        check_nccl(crossed)


def test_receives_out_of_the_senders_order_are_named():
    good = _naive(build("gpipe", 2, 3))
    stream = list(good.streams[1])
    first, second = stream.index(RecvActivation(1, 0)), stream.index(RecvActivation(1, 1))
    stream[first], stream[second] = stream[second], stream[first]
    swapped = dataclasses.replace(good, streams=(good.streams[0], tuple(stream)))
    with pytest.raises(ScheduleError, match=r"receive does not match the next message on the channel from rank 0: "
                                            r"rank 0 sent 0SA0 \(position \d+\) first"):
        check_gloo(swapped)


def test_each_rank_issues_its_transfers_in_one_global_order():
    ordered = build("interleaved_1f1b", 2, 8, 2)
    times = simulate(_naive(ordered), {"F": 1, "B": 1, "W": 1, "comm": 0.015625})
    sent_at = {}
    for rank, stream in enumerate(times.schedule.streams):
        for position, op in enumerate(stream):
            if is_send(op):
                sent_at[ordered.message_key(op)] = (times.start[(rank, position)], rank, position)
    for stream in ordered.streams:
        keys = [sent_at[ordered.message_key(part)] for op in stream for part in parts(op)
                if is_send(part) or is_recv(part)]
        assert keys == sorted(keys)


@pytest.mark.parametrize("name,p,m,v", [("1f1b", 4, 8, 1), ("zb_h1", 3, 6, 1), ("interleaved_1f1b", 2, 4, 2),
                                         ("gpipe", 3, 4, 1), ("zb_v", 3, 6, 2), ("dualpipev", 3, 7, 2)])
def test_posting_receives_early_costs_no_time(name, p, m, v):
    """Only the op that reads a message waits for it: the simulated step is unchanged."""
    ordered = build(name, p, m, v)
    costs = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.3}
    assert simulate(ordered, costs).makespan == pytest.approx(simulate(_naive(ordered), costs).makespan)


def test_an_exchange_prints_and_parses_back():
    group = Exchange((SendGrad(2, 3), RecvActivation(2, 5), RecvGrad(2, 1)))
    assert str(group) == "2SG3+2RA5+2RG1" and parse_instruction(str(group)) == group
    assert parts(group) == group.ops and parts(Forward(0, 1)) == (Forward(0, 1),)
    with pytest.raises(ScheduleError, match="sends and receives joined by '\\+'"):
        parse_instruction("0F1+0SA1")


@pytest.mark.parametrize("p,m", [(2, 4), (3, 5), (4, 8)])
def test_inference_in_a_v_is_deadlock_free(p, m):
    schedule = build("inference", p, m, 2, placement="v")  # eval of a zb_v / dualpipev model
    validate(schedule)
    check_nccl(schedule, per_pair=True)
    assert schedule.placement.kind == "v" and schedule.stages_of(0) == [0, 2 * p - 1]


def test_a_compute_order_that_waits_on_itself_is_refused_naming_the_cycle() -> None:
    """Ordering transfers plays the schedule out with the simulator, so a compute order no rank
    can finish fails there with the simulator's error (it was a bare KeyError)."""
    from pipegrid.schedules import Backward, Placement, Schedule, lower

    shape = Schedule(name="crossed", placement=Placement("loop", 2, 1), micro_batches=1, streams=(),
                     split_backward=False)
    with pytest.raises(ScheduleError, match=r"dependency cycle \(would deadlock\).*0B0.*reorder the streams"):
        lower(shape, [[Backward(0, 0), Forward(0, 0)], [Forward(1, 0), Backward(1, 0)]])


def _compute_before_receives(schedule, rank):
    """message -> how many compute ops the rank runs before it posts that message's receive."""
    seen, out = 0, {}
    for op in schedule.streams[rank]:
        seen += is_compute(op)
        for part in parts(op):
            if is_recv(part) and schedule.transfers(part):
                out[schedule.message_key(part)] = seen
    return out


@pytest.mark.parametrize("name,p,m,v,k", [("1f1b", 4, 8, 1, 1), ("zb_h1", 3, 6, 1, 1), ("zb_v", 2, 8, 2, 1),
                                           ("zb_v", 3, 6, 2, 1), ("dualpipev", 2, 8, 2, 1),
                                           ("interleaved_1f1b", 2, 8, 2, 1), ("1f1b", 2, 8, 1, 2)])
def test_receives_are_posted_as_early_as_the_order_and_the_executor_allow(name, p, m, v, k):
    """Early receives (the default) post no receive later than the late placement, some earlier;
    a stage's first activation (it waits for its shape header) stays put; a gradient's receive
    comes after its forward (the executor sizes its buffer by the forward's output)."""
    early, late = build(name, p, m, v, coalesce=k), build(name, p, m, v, coalesce=k, early_receives=False)
    moved = 0
    for rank in range(p):
        e, lt = _compute_before_receives(early, rank), _compute_before_receives(late, rank)
        assert e.keys() == lt.keys()
        for message, at in e.items():
            assert at <= lt[message]
            moved += at < lt[message]
            if message[0] == "activation" and message[2] == 0:
                assert at == lt[message], f"{message}: the first activation waits for a header where it stood"
        forwards = {(op.stage, op.micro_batch): i for i, op in enumerate(op for op in early.streams[rank]
                                                                          if is_compute(op)) if op.code == "F"}
        for (kind, stage, first), at in e.items():
            if kind == "grad":
                assert at > max(forwards[(stage, mb)] for mb in early.message_group(first))
    assert moved > 0


def test_zb_v_posts_the_turn_around_activation_before_the_first_chunks_backward():
    """The V's turn-around on rank 0 (stage 2's output comes back for stage 3) was received just
    before 3F: on gloo its sender's progress thread then had to answer on a busy core."""
    stream = [str(op) for op in build("zb_v", 2, 8, 2).streams[0]]
    group = next(op for op in stream if "3RA2" in op)
    assert stream.index(group) < stream.index("0I0") < stream.index("3F2")
