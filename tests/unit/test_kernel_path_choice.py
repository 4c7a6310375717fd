"""kernels.backend=auto: the path measured faster per direction and size class, with fake clocks
(the real kernels are exercised by tests/gpu)."""

from __future__ import annotations

import pytest

from pipegrid.kernels import backend as backend_module
from pipegrid.kernels import select_backend
from pipegrid.kernels.path_choice import MARGIN, PathChoice, size_class

# microseconds per call, as measured on an H200 (issue 27) or near it
H200 = {("pack", 1 << 30, 16): {"torch": 520.0, "cupy": 510.0},        # 2% apart: noise, torch
        ("unpack", 1 << 30, 16): {"torch": 530.0, "cupy": 700.0},      # CuPy's 68% vs torch's 90%
        ("pack", 1 << 22, 1024): {"torch": 400.0, "cupy": 50.0},       # 1000 small tensors: one launch
        ("unpack", 1 << 22, 1024): {"torch": 900.0, "cupy": 60.0}}


class FakeDevice:
    """Runs nothing; the timer returns the cost of the path last run for the move at hand."""

    def __init__(self, costs: dict) -> None:
        self.costs, self.calls, self.move = costs, [], None

    def run(self, path: str) -> None:
        self.calls.append(path)
        self.last = path

    def timer(self, fn) -> float:
        fn()
        return self.costs[self.move][self.last] * 1e-6


def _choose(choice: PathChoice, device: FakeDevice, op: str, nbytes: int, tensors: int) -> str:
    device.move = (op, *size_class(nbytes, tensors))
    return choice.choose(op, "cuda:0", nbytes, tensors, device.run)


def test_size_classes_round_up_to_powers_of_two():
    assert size_class(1000, 3) == (1024, 4)
    assert size_class(1024, 4) == (1024, 4)
    assert size_class(1025, 1000) == (2048, 1024)
    assert size_class(0, 0) == (1, 1)


def test_each_direction_and_size_takes_the_faster_path_and_ties_go_to_torch():
    device = FakeDevice(H200)
    choice = PathChoice(timer=device.timer, repeats=3)
    assert _choose(choice, device, "pack", 1 << 30, 10) == "torch"  # within the margin
    assert _choose(choice, device, "unpack", 1 << 30, 10) == "torch"
    assert _choose(choice, device, "pack", 4_000_000, 1000) == "cupy"
    assert _choose(choice, device, "unpack", 4_000_000, 1000) == "cupy"
    assert [(m.op, m.nbytes, m.tensors, m.path) for m in choice.table()] == [
        ("pack", 1 << 30, 16, "torch"), ("unpack", 1 << 30, 16, "torch"),
        ("pack", 1 << 22, 1024, "cupy"), ("unpack", 1 << 22, 1024, "cupy")]
    assert choice.table()[3].seconds == pytest.approx({"torch": 900e-6, "cupy": 60e-6})


def test_cupy_must_beat_torch_by_the_margin():
    just_inside = {("pack", 1024, 1): {"torch": 100.0, "cupy": 100.0 * (1 - MARGIN) + 0.1}}
    clear_win = {("pack", 1024, 1): {"torch": 100.0, "cupy": 100.0 * (1 - MARGIN) - 0.1}}
    for costs, want in ((just_inside, "torch"), (clear_win, "cupy")):
        device = FakeDevice(costs)
        assert _choose(PathChoice(timer=device.timer), device, "pack", 1000, 1) == want


def test_a_class_is_measured_once_alternating_after_one_warm_up_each():
    device = FakeDevice(H200)
    choice = PathChoice(timer=device.timer, repeats=3)
    _choose(choice, device, "unpack", 3_000_000, 900)
    assert device.calls == ["torch", "cupy"] + ["torch", "cupy"] * 3
    device.calls.clear()
    assert _choose(choice, device, "unpack", 4_194_304, 1024) == "cupy"  # same class: remembered
    assert device.calls == []
    assert _choose(choice, device, "pack", 4_194_304, 1024) == "cupy"  # the other direction: measured
    assert len(device.calls) == 8


def test_noise_is_outvoted_by_the_median():
    device = FakeDevice({})
    costs = iter([1.0, 1.0,  # warm-ups are not timed
                  900.0, 50.0, 900.0, 50.0, 20.0, 60.0])  # one torch sample lucky: median still 900
    def timer(fn):
        fn()
        return next(costs) * 1e-6
    choice = PathChoice(timer=timer, repeats=3)
    assert choice.choose("unpack", "cuda:0", 1 << 20, 8, device.run) == "cupy"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="op must be pack or unpack"):
        PathChoice(timer=lambda fn: 0.0).choose("copy", "cuda:0", 1, 1, lambda path: None)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        PathChoice(repeats=0)


def test_auto_leaves_the_choice_to_each_move_where_cupy_can_run(monkeypatch):
    monkeypatch.setattr(backend_module, "cupy_unavailable_reason", lambda: None)
    assert select_backend("auto", "cuda:0") == "auto"
    assert select_backend("cupy", "cuda:0") == "cupy"
    assert select_backend("auto", "cpu") == "torch"


def test_a_casting_move_is_measured_apart_from_a_bit_copy():
    device = FakeDevice({("pack", 1024, 4): {"torch": 100.0, "cupy": 10.0}})
    choice = PathChoice(timer=device.timer)
    device.move = ("pack", 1024, 4)
    choice.choose("pack", "cuda:0", 1000, 3, device.run)
    choice.choose("pack", "cuda:0", 1000, 3, device.run, kind="cast")
    assert [(m.op, m.kind) for m in choice.table()] == [("pack", "copy"), ("pack", "cast")]
