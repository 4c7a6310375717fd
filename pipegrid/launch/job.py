"""Starting a job: under torchrun (or a multi-task SLURM job) this process is a rank and runs
the entry point itself; otherwise it starts the job's ranks here through the worker pool.

How the local workers start is chosen once, in :func:`start_method_for`: spawned when they
train on GPUs or when this process has already initialised CUDA (a forked child could not
use it), forked otherwise (~0.2 s against several seconds per spawned worker importing torch).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from pipegrid.launch.local import (INIT_METHOD_ENV, WORKER_ENV, WorkerError, _restore_environment, is_torchrun,
                                   run_local)

log = logging.getLogger(__name__)

_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", INIT_METHOD_ENV)


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when the processes were started by torchrun (or similar), else None."""
    return int(os.environ["WORLD_SIZE"]) if is_torchrun() else None


def uses_cuda(backend: str = "auto", local_ranks: int = 1) -> bool:
    """Whether a job with ``comm.backend=backend`` and ``local_ranks`` ranks here runs on GPUs (NCCL).

    Counts GPUs without initialising CUDA, so the caller may still fork."""
    from pipegrid.topology.join import resolve_backend  # the one rule, shared with joining

    return resolve_backend(backend, local_ranks)[0] == "nccl"


def _choose_devices(backend: str, local_ranks: int) -> bool:
    """Whether the local workers train on GPUs; the CPU fallback's notice is said here, once,
    since its workers see no GPU and so have nothing to say."""
    from pipegrid.topology.join import resolve_backend

    chosen, notice = resolve_backend(backend, local_ranks)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    return chosen == "nccl"


def start_method_for(on_gpus: bool) -> str:
    """How to start local workers: ``spawn`` for GPU workers or once CUDA is initialised here
    (a forked child's first CUDA call would fail), ``fork`` otherwise."""
    from pipegrid.topology.devices import cuda_initialised

    if on_gpus:
        return "spawn"
    if cuda_initialised():
        log.warning("pipegrid: CUDA is already initialised in this process, so the CPU workers are spawned, "
                    "not forked (a few seconds more at start); call nothing on CUDA before launch() to fork them")
        return "spawn"
    return "fork"


def launch(fn: Callable[..., Any], *args: Any, world_size: int, backend: str = "auto",
           timeout_s: float = math.inf, start_method: str | None = None) -> Any:
    """Run ``fn(*args)`` on every rank of a ``world_size``-process job; return rank 0's result.

    Under torchrun, or as a task of a multi-task SLURM job from submitit
    (hydra-submitit-launcher), this process is a rank: it runs ``fn`` itself (and the
    result is its own). Otherwise one process runs in place, and more are started here
    (:func:`start_method_for`; ``start_method`` overrides; spawned workers must be able to
    import ``fn`` and unpickle ``args``). Workers that train on the CPU see no GPU. A CPU
    launcher without ``OMP_NUM_THREADS`` first re-executes itself with ``OMP_NUM_THREADS=1``
    (:func:`reexec_with_one_omp_thread`, logged). Only rank 0 logs below WARNING. A failed
    worker raises :class:`WorkerError` with its traceback. SIGTERM, SIGUSR1 and SIGUSR2 sent
    to this process reach the workers; when every worker then exits cleanly
    (``pipegrid.Preempted`` after a save) so does this call, by re-raising it, and when they
    die by the signal this call exits with status 128 + its number, as the signal would have.
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
    on_gpus = _choose_devices(backend, world_size)
    start_method = start_method or start_method_for(on_gpus)
    if start_method == "fork" and "OMP_NUM_THREADS" not in os.environ:
        reexec_with_one_omp_thread()
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), None)
    try:
        results = run_local(_rank_entry, world_size, (fn, args, log_file), timeout_s=timeout_s, backend=None,
                            start_method=start_method, cpu_only=not on_gpus)
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


def reexec_with_one_omp_thread() -> None:
    """Replace this process by itself with ``OMP_NUM_THREADS=1`` (same arguments, same Hydra
    output directory); warn instead where it cannot be re-executed (``-c``, interactive).

    Forked workers inherit the OpenMP runtime that was configured when torch was imported
    here: without the variable each worker's idle OpenMP threads spin on the others' cores
    (~2.5x slower with two workers on two cores). Setting it in the workers is too late.
    """
    from pipegrid.launch.hydra_app import same_output_dir_overrides

    script = sys.orig_argv[1:]
    if sys.flags.interactive or not script or script[0] == "-c" or not hasattr(sys.modules["__main__"], "__file__"):
        log.warning("OMP_NUM_THREADS is not set: local CPU workers may run ~2x slower; set OMP_NUM_THREADS=1 "
                    "before starting Python")
        return
    log.info("pipegrid: re-executing this launcher with OMP_NUM_THREADS=1 for its forked CPU workers "
             "(set OMP_NUM_THREADS yourself to skip this)")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *script, *same_output_dir_overrides()]
    os.execve(sys.executable, argv, {**os.environ, **WORKER_ENV})
