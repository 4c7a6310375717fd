"""Signal handling for preemption (issue 15, section 3), in one process: which signals are
watched, that a noted signal waits for the end of the step, that handlers come off again,
and submitit's requeue handler runs after the save. A signal ending a process without
checkpoint.dir, and the saves themselves with the local launcher and torchrun:
tests/dist/test_preemption.py and tests/dist/test_faults.py."""

from __future__ import annotations

import os
import pickle
import signal

import pytest

from pipegrid.conf.schema import to_train_config
from pipegrid.pipe.preemption import Preempted, SignalWatch


@pytest.fixture
def watch(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    made: list[SignalWatch] = []

    def make(names=("SIGTERM", "SIGUSR1"), saves=True) -> SignalWatch:
        made.append(SignalWatch(names, saves=saves, rank=0))
        return made[-1]
    yield make
    for each in made:
        each.disarm()


def test_the_default_signals_and_names_with_or_without_sig():
    assert to_train_config({}).train.save_on_signal == ["SIGTERM", "SIGUSR1"]
    assert to_train_config({"train": {"save_on_signal": ["TERM", "usr2"]}}).train.save_on_signal == ["TERM", "usr2"]


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP", "SIGNOPE"])
def test_signals_a_process_cannot_handle_are_refused(name):
    with pytest.raises(ValueError, match=rf"train.save_on_signal: '{name}' is not a signal a process can handle"):
        to_train_config({"train": {"save_on_signal": [name]}})


def test_a_noted_signal_waits_and_a_second_changes_nothing(watch):
    previous = signal.getsignal(signal.SIGUSR1)
    stop = watch()
    stop.arm()
    assert stop.armed and stop.received == 0
    os.kill(os.getpid(), signal.SIGUSR1)  # handled here, between two bytecodes
    assert stop.received == signal.SIGUSR1
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal, e.g. while the save runs
    assert stop.received == signal.SIGUSR1
    stop.disarm()
    assert signal.getsignal(signal.SIGUSR1) is previous and not stop.armed


def test_an_empty_list_installs_nothing(watch):
    before = signal.getsignal(signal.SIGTERM)
    stop = watch(names=())
    stop.arm()
    assert not stop.armed and signal.getsignal(signal.SIGTERM) is before


def test_inside_submitit_its_preemption_signal_is_watched_and_its_handler_runs_after_the_save(watch,
                                                                                            monkeypatch):
    calls = []
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: calls.append(number))  # submitit's requeue
    try:
        stop = watch()
        assert stop.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        stop.arm()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2 and calls == []  # noted only: the save comes first
        stop.chain(signal.SIGUSR2)  # what the engine does once the checkpoint is written
        assert calls == [signal.SIGUSR2]
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
        assert watch().signals == (signal.SIGTERM, signal.SIGUSR1)
        assert watch(names=()).signals == ()  # an empty list disables, inside submitit too
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_preempted_exits_zero_and_survives_pickling():
    stop = Preempted("pipegrid: SIGTERM: saved step 3 to /c/step_00000003", "SIGTERM", 3, "/c/step_00000003", 1.5)
    assert isinstance(stop, SystemExit) and stop.code == 0 and str(stop).startswith("pipegrid: SIGTERM")
    again = pickle.loads(pickle.dumps(stop))  # the local launcher sends it from a worker
    assert (again.code, again.signal_name, again.step, again.checkpoint, again.loss, str(again)) == \
        (0, "SIGTERM", 3, "/c/step_00000003", 1.5, str(stop))
