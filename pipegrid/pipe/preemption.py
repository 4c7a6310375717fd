"""Save and stop on a signal: SLURM, torchrun's agent, Kubernetes and submitit send one
(SIGTERM, SIGUSR1, submitit's SIGUSR2) before they preempt or time a job out.

A handler only notes the signal. At the end of every ``train_batch`` the ranks agree on it
through one all-reduce of one number (made only while handlers are armed and
``checkpoint.dir`` is set), so a rank that got the signal tells the others and no two
ranks disagree; every rank then saves at that step and ``train_batch`` raises
:class:`Preempted`, a ``SystemExit`` with status 0. A library does not end the process
behind its caller's back: uncaught, ``Preempted`` ends it with status 0 and runs the
``finally`` blocks and ``atexit`` handlers on the way; caught, the caller decides. The same
command then resumes from the checkpoint. Without ``checkpoint.dir`` there is nothing to
save: the handler says so and ends the process by the signal at once, as it would have
ended without pipegrid.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pipegrid.conf.schema import signal_number
from pipegrid.pipe.executor import PeerLostError, is_transport_failure, lost_peer_message
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups

__all__ = ["Preempted", "SignalWatch", "stop_if_signalled"]

log = logging.getLogger("pipegrid")


def _submitit_signal() -> int | None:
    """The signal submitit preempts and times out with inside one of its jobs (SIGUSR2 unless set)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return signal_number(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class Preempted(SystemExit):
    """``train_batch`` saved a checkpoint after a stop signal. Status 0 unless caught.

    ``signal_name``, ``step``, ``checkpoint`` (the directory written) and ``loss`` (the
    step's mean loss, which ``train_batch`` could not return) say what happened.
    """

    def __init__(self, message: str, signal_name: str = "", step: int = 0, checkpoint: str = "",
                 loss: float = float("nan")) -> None:
        super().__init__(0)
        self.message, self.signal_name, self.step, self.checkpoint, self.loss = (
            message, signal_name, step, checkpoint, loss)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # the local launcher sends it from worker to parent
        return type(self), (self.message, self.signal_name, self.step, self.checkpoint, self.loss)


class SignalWatch:
    """Notes stop signals for an engine; ``arm()`` installs the handlers, ``disarm()`` restores.

    ``saves``: whether a checkpoint directory is set. Without one, a signal ends the process
    at once (after a line on stderr); with one it is only noted, and a second signal while
    the save runs changes nothing (the save is atomic, and a SIGKILL at the scheduler's
    deadline leaves the previous checkpoint whole).
    """

    def __init__(self, names: Sequence[str], saves: bool, rank: int) -> None:
        numbers = [signal_number(name) for name in names]
        extra = _submitit_signal()
        if numbers and extra is not None and extra not in numbers:
            numbers.append(extra)  # submitit's requeue runs after the save (see chain)
        self.signals = tuple(dict.fromkeys(numbers))
        self.saves, self.rank = saves, rank
        self.received = 0
        self._previous: dict[int, Any] = {}

    @property
    def armed(self) -> bool:
        return bool(self._previous)

    def arm(self) -> None:
        if not self.signals or self.armed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("pipegrid: train.save_on_signal is ignored: handlers can only be installed from the main "
                         "thread, and this engine was made in %s", threading.current_thread().name)
            return
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._on_signal)

    def disarm(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number, previous in self._previous.items():
            if signal.getsignal(number) == self._on_signal:
                signal.signal(number, previous)
        self._previous.clear()

    def _on_signal(self, number: int, frame: Any) -> None:
        if self.saves:
            self.received = self.received or number  # a second signal: the save goes on
            return
        name = signal.Signals(number).name
        if self.rank == 0:  # os.write: a handler must not take logging's locks
            os.write(2, f"pipegrid: {name} received; checkpoint.dir is not set, so nothing was saved; "
                        "exiting\n".encode())
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)  # end as the signal would have ended the process

    def chain(self, number: int) -> None:
        """Run the handler ours replaced (submitit's requeue), now that the checkpoint is written."""
        previous: Callable[..., Any] | Any = self._previous.get(number)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(number, None)


class Stoppable(Protocol):
    """What the end-of-step stop check reads of an engine (``PipelineEngine`` is one)."""

    device: torch.device
    topology: Topology
    groups: ProcessGroups
    pipe_rank: int
    global_steps: int
    last_save: tuple[int, str] | None

    def save_checkpoint(self, directory: str | None = None) -> str: ...


def stop_if_signalled(engine: Stoppable, watch: SignalWatch, loss: float) -> None:
    """Collective, at the end of ``engine.train_batch``: agree whether any rank noted a stop
    signal; if one did, every rank saves this step (unless its interval save just did) and
    raises :class:`Preempted`. One int64 all-reduce over the world when nothing is due."""
    flag = torch.tensor([watch.received], dtype=torch.int64, device=engine.device)
    world, rank = engine.topology.world_size, engine.groups.rank
    if world > 1:
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        except (dist.DistError, RuntimeError) as error:
            if not is_transport_failure(error):
                raise
            peers = f"one of ranks {[r for r in range(world) if r != rank]}"
            raise PeerLostError(lost_peer_message(rank, engine.pipe_rank, peers, "while agreeing on a stop signal",
                                                  error, applied=True)) from error
    number = int(flag.item())
    if not number:
        return
    step, last = engine.global_steps, engine.last_save
    path = last[1] if last is not None and last[0] == step else engine.save_checkpoint()
    name = signal.Signals(number).name
    message = f"pipegrid: {name}: saved step {step} to {path}; run the same command to resume from it"
    if rank == 0:
        log.warning(message)
    watch.received = 0  # acted on: a caller that catches Preempted and trains on is not stopped again
    watch.chain(number)  # a handler ours replaced (submitit's requeue) runs after the save
    raise Preempted(message, name, step, path, loss)
