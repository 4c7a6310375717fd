"""Run N local workers when not under torchrun (a convenience, not a transport).

Workers rendezvous through a FileStore in a temporary directory (no port), start
with ``OMP_NUM_THREADS=1``, and one failed or dead worker ends the whole run with
that worker's traceback. The distributed tests use the same code.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

# Set in every worker's environment before it runs any torch code. OMP: idle
# OpenMP threads spin and steal the other workers' cores (~2.5x slower on 2 cores).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
INIT_METHOD_ENV = "PIPEGRID_INIT_METHOD"
_GRACE_S = 1.0  # after a first failure, how long to wait for the others (to name the cause)


class WorkerError(RuntimeError):
    """A local worker raised or died; the message carries its rank and traceback."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.when = 0.0  # wall-clock time of the failure, to find the first one


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
            backend: str | None, timeout_s: float, conn: mp_connection.Connection) -> None:
    _die_with_parent()
    os.environ.update(WORKER_ENV)
    if "torch" in sys.modules:
        # Forked from a parent that may have run OpenMP work: a one-thread region never
        # touches the parent's (now missing) thread pool, which would hang the child.
        sys.modules["torch"].set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), INIT_METHOD_ENV: init_method})
    try:
        import torch.distributed as dist

        if backend is not None:
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
    except BaseException:  # noqa: BLE001 - every failure must reach the launcher
        conn.send_bytes(pickle.dumps(("error", (time.time(), traceback.format_exc()))))
        conn.close()
        os._exit(1)
    conn.close()


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout_s: float = 60.0,
              backend: str | None = "gloo", start_method: str = "fork") -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks and return each rank's result, in rank order.

    ``backend`` initialises torch.distributed in each worker (None: ``fn`` does it
    itself, e.g. through ``pipegrid.initialize``, reading the environment). A rank
    that raises or dies ends the run at once with :class:`WorkerError`; a run that
    outlives ``timeout_s`` is killed and raises ``TimeoutError``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="pipegrid-rdzv-") as rdzv_dir:
        init_method = f"file://{os.path.join(rdzv_dir, 'store')}"
        workers, conns = [], []
        for rank in range(world_size):
            parent_end, child_end = context.Pipe(duplex=False)
            proc = context.Process(target=_worker, name=f"pipegrid-rank{rank}", daemon=True,
                                   args=(fn, args, rank, world_size, init_method, backend, timeout_s, child_end))
            proc.start()
            child_end.close()
            workers.append(proc)
            conns.append(parent_end)
        try:
            return _collect(workers, conns, timeout_s)
        finally:
            _stop_all(workers)


def _collect(workers: list, conns: list, timeout_s: float) -> list[Any]:
    """Wait for every rank's result; fail fast on the first error or death.

    When one rank fails its peers soon fail too (their collectives lose it), so
    errors arriving within a short grace period are gathered and the earliest
    one, the cause, is raised.
    """
    results: dict[int, Any] = {}
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
    if errors:
        raise min(errors, key=lambda item: item[0])[1]
    return [results[r] for r in range(len(workers))]


def _receive(rank: int, conn: mp_connection.Connection, proc: mp.process.BaseProcess) -> Any:
    try:
        status, payload = pickle.loads(conn.recv_bytes())
    except EOFError:
        proc.join(timeout=1.0)
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        error = WorkerError(rank, f"rank {rank} {how} before returning a result")
        error.when = time.time() - 0.5  # a death has no timestamp; assume it preceded the peers' errors
        raise error from None
    if status == "error":
        when, text = payload
        error = WorkerError(rank, f"rank {rank} raised:\n{text}")
        error.when = when
        raise error
    return payload


def _stop_all(workers: list) -> None:
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
