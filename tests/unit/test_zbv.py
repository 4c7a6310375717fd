"""The V schedules (zb_v, dualpipev) against torch's own, the placement, the registry and the
loss message in the IR."""

from __future__ import annotations

import dataclasses
import itertools
import re
from fractions import Fraction
from functools import cache

import pytest

from pipegrid.schedules import (
    SCHEDULES, Backward, BackwardInput, BackwardWeight, Forward, Placement, Schedule, ScheduleError,
    ScheduleSpec, build, dualpipev, gpipe, lower, parts, registry, simulate, to_text, validate, zb_v,
)
from pipegrid.schedules.loss_message import knows_loss_after

UNIT = {"F": Fraction(1), "B": Fraction(1), "W": Fraction(1), "comm": Fraction(0)}  # F = I = W = 1 per chunk
SIZES = [(p, m) for p in range(2, 9) for m in range(2 * p, 4 * p + 1)]  # the p = 2..8, m = 2p..4p
_TORCH_KINDS = {"FORWARD": Forward, "BACKWARD_INPUT": BackwardInput, "BACKWARD_WEIGHT": BackwardWeight,
                "FULL_BACKWARD": Backward}


def _torch_order(name: str, p: int, m: int) -> list[list]:
    """torch's own action lists (``get_schedule_ops``) as pipegrid compute instructions;
    an overlapped forward/backward pair is its forward, then its backward."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    order = []
    for actions in get_schedule_ops(name, p, m):
        ops = []
        for action in filter(None, actions):
            for sub in action.sub_actions or (action,):
                ops.append(_TORCH_KINDS[sub.computation_type.name](sub.stage_index, sub.microbatch_index))
        order.append(ops)
    return order


@cache
def _torch(name: str, p: int, m: int) -> Schedule:
    """torch's order, lowered by pipegrid's passes and so timed by the same simulator."""
    shape = Schedule(name=f"torch {name}", placement=Placement("v", p, 2), micro_batches=m, streams=(),
                     split_backward=True)
    return lower(shape, _torch_order(name, p, m))


@cache
def _sim(name: str, p: int, m: int):
    return simulate(build(name, p, m, (SCHEDULES[name].chunks or (1,))[0]), UNIT)


# --- the numbers the issue asks for --------------------------------------------------

def test_zb_v_bubble_is_at_most_torchs_zbv_and_about_a_fifth_of_1f1b() -> None:
    """Every rank idles p-1 slots, the fewest any schedule can: rank p-1 waits for p-1 forwards
    before its first op and then has 6m slots of work. torch's ZBV, timed by the same
    simulator, is checked at m = 2p, 2p+1, 3p, 4p (its builder is slow: ~0.2 s a call)."""
    for p, m in SIZES:
        ours = _sim("zb_v", p, m)
        assert ours.idle == (p - 1,) * p and ours.makespan == 6 * m + p - 1, (p, m)
        one_f_one_b = Fraction(p - 1, m + p - 1)
        assert Fraction(1, 6) <= ours.bubble_fraction / one_f_one_b <= Fraction(1, 4), (p, m)
        if m in (2 * p, 2 * p + 1, 3 * p, 4 * p):
            assert ours.bubble_fraction <= simulate(_torch("ZBVZeroBubble", p, m), UNIT).bubble_fraction, (p, m)


def test_zb_v_holds_no_more_activations_than_1f1b() -> None:
    """Per rank, forward to weight gradient, in whole stages: a zb_v chunk is half a 1F1B stage."""
    for p, m in SIZES:
        ours, ref = _sim("zb_v", p, m), _sim("1f1b", p, m)
        assert max(ours.peak_held) <= 2 * max(ref.peak_held), (p, m)
        assert max(ours.peak_held) == 2 * p  # p whole stages, 1F1B's first rank


def test_dualpipev_bubble_is_below_1f1bs() -> None:
    for p, m in SIZES:
        assert _sim("dualpipev", p, m).bubble_fraction < _sim("1f1b", p, m).bubble_fraction, (p, m)


@pytest.mark.parametrize("name,torch_name,module", [("zb_v", "ZBVZeroBubble", zb_v),
                                                    ("dualpipev", "DualPipeV", dualpipev)])
def test_compute_orders_are_torchs(name, torch_name, module) -> None:
    """Written here from the papers' phases; torch runs the very same order (so its bubble too)."""
    for p, m in [(2, 4), (3, 7), (4, 8), (5, 13), (2, 3), (4, 3)]:
        if name == "dualpipev" and m < 2 * p:
            continue
        ours = module.compute_order(Placement("v", p, 2), m)
        assert [list(map(str, ops)) for ops in ours] == [list(map(str, ops)) for ops in _torch_order(torch_name, p, m)]


def test_docstrings_draw_the_real_timelines() -> None:
    for name, module in (("zb_v", zb_v), ("dualpipev", dualpipev)):
        table = to_text(simulate(build(name, 2, 4, 2), UNIT)).replace(" .", " ·").splitlines()
        for row in table[1:3]:
            assert row in module.__doc__, (name, row)


# --- placement ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,chunks", [("loop", 1), ("loop", 2), ("loop", 3), ("v", 2), ("v", 4)])
def test_placement_is_one_map_and_its_inverse(kind: str, chunks: int) -> None:
    for p in range(1, 9):
        placement = Placement(kind, p, chunks)
        for rank in range(p):
            assert [placement.rank_of(s) for s in placement.stages_of(rank)] == [rank] * chunks
        assert sorted(s for r in range(p) for s in placement.stages_of(r)) == list(range(p * chunks))
    assert Placement("v", 3, 2).stages_of(0) == [0, 5] and Placement("loop", 3, 2).stages_of(0) == [0, 3]
    assert Placement("v", 3, 2).describe() == "rank 0: 0 5 | rank 1: 1 4 | rank 2: 2 3"


def test_bad_placements_say_what_to_do() -> None:
    with pytest.raises(ScheduleError, match="one of loop, v, got 'ring'"):
        Placement("ring", 2)
    with pytest.raises(ValueError, match=r"model stage must be in \[0, 4\), got 4"):
        Placement("v", 2, 2).rank_of(4)
    with pytest.raises(ScheduleError, match="zb_v places model stages 'v', got placement 'loop'"):
        build("zb_v", 2, 4, 2, placement="loop")


def test_no_stage_to_rank_arithmetic_outside_the_placement() -> None:
    """Every ``stage % p``-style map went into Placement; the rest of pipegrid asks it (code
    only: docstrings may still say what "loop" means)."""
    import io
    import tokenize
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipegrid"
    pattern = re.compile(r"\b(stage\w*|s)\s*%\s*(self\.)?(p|num_stages|pipe|topology\.pipe|num_ranks)\b")
    assert pattern.search("rank = stage % self.num_stages") and not pattern.search("step % p")  # it can fail
    found = []
    for path in root.rglob("*.py"):
        if path.name == "placement.py":
            continue
        lines: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type not in (tokenize.STRING, tokenize.COMMENT):
                lines[token.start[0]] = lines.get(token.start[0], "") + " " + token.string
        found += [f"{path.relative_to(root)}:{n}" for n, code in lines.items() if pattern.search(code)]
    assert not found, found


# --- the registry ---------------------------------------------------------------------

def test_adding_a_schedule_is_one_record(monkeypatch) -> None:
    """A module's compute order plus one registry entry: build, validate, the config and the planner see it."""
    from pipegrid.conf.schema import ScheduleConfig

    toy = ScheduleSpec("toy_gpipe", gpipe.compute_order, "GPipe again, under another name",
                       hints=SCHEDULES["gpipe"].hints)
    monkeypatch.setitem(registry.SCHEDULES, "toy_gpipe", toy)
    validate(build("toy_gpipe", 3, 5))
    assert ScheduleConfig(name="toy_gpipe").name == "toy_gpipe"
    with pytest.raises(ValueError, match="schedule.name must be one of"):
        ScheduleConfig(name="nope")


def test_the_config_and_the_cli_list_the_registry() -> None:
    from pipegrid.conf.schema import SCHEDULES as CONFIG_SCHEDULES, ScheduleConfig

    assert set(CONFIG_SCHEDULES) == {n for n, spec in SCHEDULES.items() if spec.training}
    assert {"zb_v", "dualpipev"} <= set(CONFIG_SCHEDULES)
    with pytest.raises(ValueError, match="zb_v runs 2 model chunks per rank, got virtual_stages=1"):
        ScheduleConfig(name="zb_v", virtual_stages=1)
    assert ScheduleConfig(name="dualpipev", virtual_stages=2, micro_batches=8).virtual_stages == 2


def test_stage_placement_answers_what_a_configs_schedule_needs() -> None:
    """What an app passes to PipelineModule so one ``schedule=`` override switches placement too."""
    import pipegrid as pg
    from pipegrid.conf.schema import ScheduleConfig

    assert pg.stage_placement(ScheduleConfig(name="zb_v", virtual_stages=2)) == "v"
    assert pg.stage_placement(ScheduleConfig(name="dualpipev", virtual_stages=2, micro_batches=8)) == "v"
    assert pg.stage_placement(ScheduleConfig(name="interleaved_1f1b", virtual_stages=2)) == "loop"
    assert pg.stage_placement("1f1b") == "loop"
    with pytest.raises(ScheduleError, match="unknown schedule 'zbv'"):
        pg.stage_placement("zbv")

# --- the loss message -----------------------------------------------------------------

def _marked(schedule: Schedule) -> list[tuple[int, str]]:
    return [(rank, str(part)) for rank, stream in enumerate(schedule.streams) for op in stream
            for part in parts(op) if getattr(part, "loss", False)]


@pytest.mark.parametrize("name,p,m,v", [("1f1b", 4, 6, 1), ("zb_v", 3, 6, 2), ("dualpipev", 3, 7, 2),
                                         ("interleaved_1f1b", 2, 4, 2), ("zb_h1", 3, 2, 1)])
def test_every_rank_but_the_loss_rank_receives_the_loss_once(name, p, m, v) -> None:
    schedule = build(name, p, m, v)
    receives = [rank for rank, text in _marked(schedule) if "RG" in text]
    assert sorted(receives) == sorted(set(range(p)) - {schedule.loss_rank})
    result = simulate(schedule, UNIT)
    assert all(0 < t <= result.makespan for t in result.loss_known)
    assert knows_loss_after(schedule) is not None


def test_the_v_sends_the_loss_from_rank_0() -> None:
    schedule = build("zb_v", 3, 6, 2)
    assert schedule.loss_rank == 0 and "5SG5*" in [text for rank, text in _marked(schedule) if rank == 0]


def _remarked(schedule: Schedule, marks: dict[str, bool]) -> Schedule:
    """``schedule`` with the loss mark of the named transfers (``"1SG3"``) set or cleared."""
    def mark(op):
        if hasattr(op, "ops"):
            return dataclasses.replace(op, ops=tuple(mark(part) for part in op.ops))
        name = str(op).rstrip("*")
        return dataclasses.replace(op, loss=marks[name]) if name in marks else op
    return dataclasses.replace(schedule, streams=tuple(tuple(map(mark, stream)) for stream in schedule.streams))


def test_broken_loss_marks_are_caught() -> None:
    good = build("1f1b", 3, 4)  # rank 2 has the loss: 2SG3* -> 1RG3*, then 1SG3* -> 0RG3*
    assert [text for _, text in _marked(good)] == ["0RG3*", "1RG3*", "1SG3*", "2SG3*"]
    validate(_remarked(good, dict.fromkeys(["0RG3", "1RG3", "1SG3", "2SG3"], False)))  # none: an all-reduce
    with pytest.raises(ScheduleError, match="carries the loss on one end only"):
        validate(_remarked(good, {"0RG3": False}))
    with pytest.raises(ScheduleError, match=r"must reach each of \[0, 1\] exactly once"):
        validate(_remarked(good, {"0RG3": False, "1SG3": False}))
    early = _remarked(good, {"0RG3": False, "1SG3": False, "0RG0": True, "1SG0": True})
    with pytest.raises(ScheduleError, match=r"rank 1, position \d+ .*sends the loss on \('grad', 0, 0\) before "
                                            r"it knows it"):
        validate(early)


def test_text_marks_the_carrying_message() -> None:
    table = build("1f1b", 2, 2).table()
    assert "0RG1*" in table and "1SG1*" in table
    assert all(text.endswith("*") for _, text in _marked(build("zb_v", 2, 5, 2)))
    assert not any(itertools.chain.from_iterable(_marked(build(n, 1, 4, v)) for n, v in (("1f1b", 1), ("zb_v", 2))))
