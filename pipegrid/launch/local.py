"""The local worker pool: N ranks on this host as forked (CPU) or spawned (CUDA) processes.

``run_local`` starts them, rendezvous through a FileStore in a temporary directory (no
port), with ``OMP_NUM_THREADS=1``; one failed or dead worker ends the whole run with that
worker's traceback, and SIGTERM/SIGUSR1/SIGUSR2 sent to the launcher reach the workers.
Forked workers train on the CPU and see no GPU; forking after CUDA was initialised is refused,
and forking after inductor compiled here works (the child makes its own compile threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

# Set in every worker's environment before it runs any torch code. OMP: idle
# OpenMP threads spin and steal the other workers' cores (~2.5x slower on 2 cores).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
INIT_METHOD_ENV = "PIPEGRID_INIT_METHOD"
_GRACE_S = 1.0  # after a first failure, how long to wait for the others (to name the cause)


class WorkerError(RuntimeError):
    """A local worker raised or died; the message carries its rank and traceback."""

    def __init__(self, rank: int, message: str, signal_number: int = 0) -> None:
        super().__init__(message)
        self.rank = rank
        self.when = 0.0  # wall-clock time of the failure, to find the first one
        self.signal = signal_number
        """The signal that killed the worker (0: it raised, or exited)."""
        self.forwarded = False
        """Whether the launcher had received that signal and passed it on to its workers."""


def is_torchrun() -> bool:
    """True when torchrun (or another launcher) already set the rank environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its launcher dies, so none is left behind."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(fn: Callable[..., Any], args: tuple, rank: int, world_size: int, init_method: str,
            backend: str | None, timeout_s: float, worker_env: dict[str, str],
            conn: mp_connection.Connection) -> None:
    _die_with_parent()
    os.environ.update(worker_env)  # before any torch code here (a hidden GPU stays hidden)
    if "torch" in sys.modules:
        # Forked from a parent that may have run OpenMP work: a one-thread region never
        # touches the parent's (now missing) thread pool, which would hang the child.
        sys.modules["torch"].set_num_threads(1)
    _forget_parent_compile_threads()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), INIT_METHOD_ENV: init_method})
    try:
        import torch.distributed as dist

        if backend is not None:
            from pipegrid.topology.join import import_before_joining

            import_before_joining()
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(*args)
        # (on failure the process exits without tearing the group down: that could
        # block on the peers, and the launcher must hear about the error first)
        if dist.is_initialized():
            dist.destroy_process_group()
        # plain pickle copies tensor bytes; multiprocessing's own pickler would
        # share them through file descriptors that die with this process
        conn.send_bytes(pickle.dumps(("ok", result)))
    except SystemExit as stop:
        if stop.code not in (0, None):
            _report_error(conn)
        # a clean exit (pipegrid.Preempted after a save on a signal): the launcher re-raises it
        conn.send_bytes(pickle.dumps(("exit", stop)))
        conn.close()
        os._exit(0)
    except BaseException:  # noqa: BLE001 - every failure must reach the launcher
        _report_error(conn)
    conn.close()


def _forget_parent_compile_threads() -> None:
    """A child forked after inductor compiled in the parent inherits inductor's cached compile
    thread pool but not its thread, and its first compile would wait on it forever. torch's own
    at-fork hook clears the process pool only (torch 2.11-2.13), so clear the thread pool too."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    pool = getattr(getattr(async_compile, "AsyncCompile", None), "pool", None)
    if pool is not None and hasattr(pool, "cache_clear"):
        pool.cache_clear()


def _report_error(conn: mp_connection.Connection) -> None:
    """Send the exception being handled to the launcher and end this worker."""
    conn.send_bytes(pickle.dumps(("error", (time.time(), traceback.format_exc()))))
    conn.close()
    os._exit(1)


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout_s: float = 60.0,
              backend: str | None = "gloo", start_method: str = "fork", cpu_only: bool | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks and return each rank's result, in rank order.

    ``backend`` initialises torch.distributed in each worker (None: ``fn`` does it
    itself, e.g. through ``pipegrid.initialize``, reading the environment). A rank
    that raises or dies ends the run at once with :class:`WorkerError`; a run that
    outlives ``timeout_s`` is killed and raises ``TimeoutError``. A rank that exits
    cleanly (``SystemExit`` with status 0, e.g. ``pipegrid.Preempted``) is waited for
    like one that returns, and its exception is raised here once all are done. SIGTERM,
    SIGUSR1 and SIGUSR2 sent to this process are passed on to the workers meanwhile.

    ``cpu_only`` workers get ``CUDA_VISIBLE_DEVICES=""``, so nothing in them (torch's
    optimizer step asks CUDA about graph capture) can touch a GPU; default: forked workers
    are CPU workers, spawned ones may use GPUs. Forking from a process that has initialised
    CUDA is refused here, naming the fix, instead of crashing in a worker's first CUDA call.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from pipegrid.topology.devices import HIDE_GPUS_ENV, refuse_fork_after_cuda  # (imports torch)

    if start_method == "fork":
        refuse_fork_after_cuda("run_local(start_method='fork')")
    cpu_only = start_method == "fork" if cpu_only is None else cpu_only
    worker_env = {**WORKER_ENV, **(HIDE_GPUS_ENV if cpu_only else {})}
    context = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="pipegrid-rdzv-") as rdzv_dir:
        init_method = f"file://{os.path.join(rdzv_dir, 'store')}"
        workers, conns = [], []
        with _environment(worker_env if start_method != "fork" else {}):
            # (a spawned worker imports torch before _worker runs: it needs the variables at birth)
            for rank in range(world_size):
                parent_end, child_end = context.Pipe(duplex=False)
                proc = context.Process(target=_worker, name=f"pipegrid-rank{rank}", daemon=True,
                                       args=(fn, args, rank, world_size, init_method, backend, timeout_s,
                                             worker_env, child_end))
                proc.start()
                child_end.close()
                workers.append(proc)
                conns.append(parent_end)
        try:
            with _forwarding_signals(workers) as received:
                try:
                    return _collect(workers, conns, timeout_s)
                except WorkerError as error:
                    error.forwarded = error.signal in received
                    raise
        finally:
            _stop_all(workers)


# Sent to a launcher by name (kill, SLURM, a scheduler) rather than to its process group:
# passed on to the workers, whose engines save and stop (train.save_on_signal). SIGINT and
# SIGHUP from a terminal reach the workers directly (same process group).
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _forwarding_signals(workers: list) -> Iterator[list[int]]:
    """While the block runs, pass SIGTERM, SIGUSR1 and SIGUSR2 sent to this process on to
    ``workers``; the block gets the list of the signals passed on."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may install
        yield received
        return

    def forward(number: int, frame: Any) -> None:
        received.append(number)
        for proc in workers:
            with contextlib.suppress(ProcessLookupError, TypeError):  # exited, or not started
                os.kill(proc.pid, number)

    previous = {number: signal.signal(number, forward) for number in _FORWARDED}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _collect(workers: list, conns: list, timeout_s: float) -> list[Any]:
    """Wait for every rank's result; fail fast on the first error or death.

    When one rank fails its peers soon fail too (their collectives lose it), so
    errors arriving within a short grace period are gathered and the earliest
    one, the cause, is raised.
    """
    results: dict[int, Any] = {}
    exits: dict[int, SystemExit] = {}
    errors: list[tuple[float, WorkerError]] = []
    deadline = time.monotonic() + timeout_s
    pending = dict(enumerate(conns))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if errors:
                break
            raise TimeoutError(f"local workers {sorted(pending)} did not finish within {timeout_s:.0f} s; "
                               "they were killed (a deadlock, or raise the timeout)")
        ready = mp_connection.wait([*pending.values(), *(workers[r].sentinel for r in pending)],
                                   timeout=min(remaining, 1.0))
        for rank, conn in list(pending.items()):
            if conn in ready or workers[rank].sentinel in ready:
                del pending[rank]
                try:
                    results[rank] = _receive(rank, conn, workers[rank])
                except WorkerError as error:
                    errors.append((getattr(error, "when", time.time()), error))
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                except SystemExit as stop:  # a clean exit: wait for the others
                    exits[rank] = stop
    if errors:
        raise min(errors, key=lambda item: item[0])[1]
    if exits:  # e.g. every rank saved on a signal and raised pipegrid.Preempted: so does the launcher
        raise exits[min(exits)]
    return [results[r] for r in range(len(workers))]


def _receive(rank: int, conn: mp_connection.Connection, proc: mp.process.BaseProcess) -> Any:
    try:
        status, payload = pickle.loads(conn.recv_bytes())
    except EOFError:
        proc.join(timeout=1.0)
        code = proc.exitcode
        killed = -code if code is not None and code < 0 else 0
        how = f"was killed by signal {killed} ({_signal_name(killed)})" if killed else f"exited with code {code}"
        error = WorkerError(rank, f"rank {rank} {how} before returning a result", killed)
        error.when = time.time() - 0.5  # a death has no timestamp; assume it preceded the peers' errors
        raise error from None
    if status == "exit":
        raise payload
    if status == "error":
        when, text = payload
        error = WorkerError(rank, f"rank {rank} raised:\n{text}")
        error.when = when
        raise error
    return payload


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def _stop_all(workers: list) -> None:
    """SIGKILL the workers still alive (after a failure): one may be stopped (SIGSTOP) or
    stuck in a collective, and SIGTERM may mean "save, then stop" to a worker's engine."""
    for proc in workers:
        if proc.is_alive():
            proc.kill()
    for proc in workers:
        proc.join(timeout=5.0)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        _restore_environment(saved)


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


