"""Start a job's processes: N local workers when not under torchrun; torchrun's otherwise.

``launch(fn, *args, world_size=N)`` is what an entry point calls: under torchrun this
process is one rank and runs ``fn`` itself; otherwise it starts N local workers
(fork on CPU, spawn with CUDA) that rendezvous through a FileStore in a temporary
directory (no port) and start with ``OMP_NUM_THREADS=1``; one failed or dead worker
ends the whole run with that worker's traceback. ``hydra_main`` wraps ``hydra.main``
for the packaged configs. ``run_local`` is the worker pool, also used by the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import gc
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import re
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


def _report_error(conn: mp_connection.Connection) -> None:
    """Send the exception being handled to the launcher and end this worker."""
    conn.send_bytes(pickle.dumps(("error", (time.time(), traceback.format_exc()))))
    conn.close()
    os._exit(1)


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout_s: float = 60.0,
              backend: str | None = "gloo", start_method: str = "fork") -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks and return each rank's result, in rank order.

    ``backend`` initialises torch.distributed in each worker (None: ``fn`` does it
    itself, e.g. through ``pipegrid.initialize``, reading the environment). A rank
    that raises or dies ends the run at once with :class:`WorkerError`; a run that
    outlives ``timeout_s`` is killed and raises ``TimeoutError``. A rank that exits
    cleanly (``SystemExit`` with status 0, e.g. ``pipegrid.Preempted``) is waited for
    like one that returns, and its exception is raised here once all are done. SIGTERM,
    SIGUSR1 and SIGUSR2 sent to this process are passed on to the workers meanwhile.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="pipegrid-rdzv-") as rdzv_dir:
        init_method = f"file://{os.path.join(rdzv_dir, 'store')}"
        workers, conns = [], []
        with _environment(WORKER_ENV if start_method != "fork" else {}):
            # (a spawned worker imports torch before _worker runs: it needs the variables at birth)
            for rank in range(world_size):
                parent_end, child_end = context.Pipe(duplex=False)
                proc = context.Process(target=_worker, name=f"pipegrid-rank{rank}", daemon=True,
                                       args=(fn, args, rank, world_size, init_method, backend, timeout_s,
                                             child_end))
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


# --- launching a job -------------------------------------------------------------

# Under torchrun every rank runs the entry point; only rank 0 keeps Hydra's output
# directory and log, so a run has one directory (not one per rank).
_OTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra.run.dir=.",
                         "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", INIT_METHOD_ENV)


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when the processes were started by torchrun (or similar), else None."""
    return int(os.environ["WORLD_SIZE"]) if is_torchrun() else None


def uses_cuda(backend: str = "auto", local_ranks: int = 1) -> bool:
    """Whether a job with ``comm.backend=backend`` and ``local_ranks`` ranks here runs on GPUs (NCCL)."""
    from pipegrid.topology.join import resolve_backend  # the one rule, shared with joining

    return resolve_backend(backend, local_ranks)[0] == "nccl"


def launch(fn: Callable[..., Any], *args: Any, world_size: int, backend: str = "auto",
           timeout_s: float = math.inf, start_method: str | None = None) -> Any:
    """Run ``fn(*args)`` on every rank of a ``world_size``-process job; return rank 0's result.

    Under torchrun, or as a task of a multi-task SLURM job from submitit
    (hydra-submitit-launcher), this process is a rank: it runs ``fn`` itself (and the
    result is its own). Otherwise one process runs in place, and more are started here: forked on
    CPU, spawned with CUDA (``start_method`` overrides; spawned workers must be able to
    import ``fn`` and unpickle ``args``). A CPU launcher
    without ``OMP_NUM_THREADS`` first re-executes itself with ``OMP_NUM_THREADS=1``
    (same arguments, same Hydra output directory), because forked workers inherit an
    OpenMP runtime that was configured when torch was imported. Only rank 0 logs
    below WARNING. A failed worker raises :class:`WorkerError` with its traceback.
    SIGTERM, SIGUSR1 and SIGUSR2 sent to this process reach the workers; when every
    worker then exits cleanly (``pipegrid.Preempted`` after a save) so does this call, by
    re-raising it, and when they die by the signal this call exits with status 128 + its
    number, as the signal would have ended it.
    """
    _export_submitit_environment()
    started = torchrun_world_size()
    if started is not None and started != world_size:
        raise ValueError(f"the job needs {world_size} processes but torchrun started WORLD_SIZE={started}; "
                         f"start it with --nproc-per-node (x --nnodes) = {world_size} or change the topology")
    if started is not None or world_size == 1:
        return _run_in_place(fn, args)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    start_method = start_method or ("spawn" if uses_cuda(backend, world_size) else "fork")
    if start_method == "fork" and "OMP_NUM_THREADS" not in os.environ:
        _reexec_with_one_omp_thread()
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), None)
    try:
        results = run_local(_rank_entry, world_size, (fn, args, log_file), timeout_s=timeout_s, backend=None,
                            start_method=start_method)
    except WorkerError as error:
        if error.forwarded:  # the workers ended by the signal sent to the job: so does the launcher's status
            raise SystemExit(128 + error.signal) from None
        raise
    return results[0]


def _export_submitit_environment() -> None:
    """In a multi-task submitit SLURM job every task is a rank: export torchrun's variables."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if is_torchrun() or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or tasks < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # the engine picks cuda:LOCAL_RANK


def _run_in_place(fn: Callable[..., Any], args: tuple) -> Any:
    """Run one rank here; leave no process group or rank variables behind (for multirun)."""
    saved = {key: os.environ.get(key) for key in _RANK_ENV}
    if not is_torchrun():
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    try:
        result = _rank_entry(fn, args, None)
        import torch.distributed as dist  # (after a failure, tearing down could block on peers)

        # Free what ``fn`` left in reference cycles first: a process group still referenced
        # outlives destroy_process_group, and its gloo threads alive at interpreter shutdown
        # can abort the process ("terminate called without an active exception").
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return result
    finally:
        _restore_environment(saved)


def _rank_entry(fn: Callable[..., Any], args: tuple, log_file: str | None) -> Any:
    """A worker's prologue: rank 0 logs (to the run's log file too), the others only warn."""
    root = logging.getLogger()
    if int(os.environ.get("RANK", "0")) != 0:
        root.setLevel(logging.WARNING)
    elif not root.handlers:  # spawned: Hydra's handlers live in the launcher only
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if log_file is not None:
            handlers.append(logging.FileHandler(log_file))
        logging.basicConfig(level=logging.INFO, handlers=handlers,
                            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return fn(*args)


def _reexec_with_one_omp_thread() -> None:
    """Replace this process by itself with ``OMP_NUM_THREADS=1``; warn when that is impossible."""
    script = sys.orig_argv[1:]
    if sys.flags.interactive or not script or script[0] == "-c" or not hasattr(sys.modules["__main__"], "__file__"):
        logging.getLogger(__name__).warning(
            "OMP_NUM_THREADS is not set: local CPU workers may run ~2x slower; set OMP_NUM_THREADS=1 "
            "before starting Python")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *script, *_same_hydra_dir_overrides()]
    os.execve(sys.executable, argv, {**os.environ, **WORKER_ENV})


def _same_hydra_dir_overrides() -> list[str]:
    """Overrides that make a re-executed Hydra app reuse this run's output directory."""
    if "hydra" not in sys.modules:
        return []
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep restarts, its first job in the same place
        return [f"hydra.sweep.dir={_override_value(str(hydra_cfg.sweep.dir))}"]
    return [f"hydra.run.dir={_override_value(hydra_cfg.runtime.output_dir)}"]


def _override_value(text: str) -> str:
    """A Hydra command-line value: as is when plain, else single-quoted."""
    if re.fullmatch(r"[\w/.:+~@-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``hydra.main`` over pipegrid's packaged configs (``pkg://pipegrid.conf``, version_base 1.3).

    Also registers the schemas in Hydra's ConfigStore, and under torchrun makes the
    ranks other than 0 write no output directory and no log, so a run has one.
    """
    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def entry() -> Any:
            import hydra

            from pipegrid.conf.store import CONFIG_PATH, register_configs

            register_configs()
            if is_torchrun() and int(os.environ["RANK"]) != 0:
                sys.argv.extend(_OTHER_RANK_OVERRIDES)
            return hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)()
        return entry
    return decorate
