"""Joining torch.distributed from torchrun's (or the local launcher's) environment, and
leaving it cleanly at exit: what :func:`pipegrid.initialize` does before it builds the grid."""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.conf.schema import TrainConfig, to_train_config
from pipegrid.topology.affinity import bind_cores
from pipegrid.topology.devices import visible_gpu_count
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups, check_world_size

__all__ = ["import_before_joining", "init_distributed", "resolve_backend", "local_cuda_device",
           "header_group"]


def import_before_joining() -> None:
    """Import, while no default group exists, the torch modules that capture it when imported.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as default arguments. Imported
    after the default group exists (torch._dynamo imports it lazily, e.g. on the first
    meta-device op, which ``LayerSpec.num_parameters`` runs), it keeps that group alive past
    ``destroy_process_group``: gloo's threads then live into interpreter shutdown, where they
    can abort the process ("terminate called without an active exception").
    """
    if dist.is_available() and not dist.is_initialized():
        import torch.distributed.nn.functional  # noqa: F401


def _leave_process_group() -> None:
    """At exit, tear down the gloo group :func:`initialize` joined, while the interpreter is whole.

    Gloo's threads still running at interpreter shutdown can abort the process, and a user
    of pipegrid never called init_process_group, so never thinks of destroying it. Gloo's
    teardown is local; NCCL's may wait on the peers, so an NCCL group, and any group after
    an unhandled exception, is left to the process's end as torch leaves it.
    """
    if hasattr(sys, "last_value") or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    gc.collect()  # a dropped engine's groups go with it
    dist.destroy_process_group()
    _wait_for_gloo_threads()


def _wait_for_gloo_threads(seconds: float = 2.0) -> None:
    """Give gloo's threads a moment to end after the group is destroyed (Linux: /proc names them).

    A group's last reference can be dropped on one of gloo's own threads (a finished work
    item), and then its device's loop thread is joined there, not in the destroying call: a
    CI run once reached interpreter shutdown with one ``gloo_tcp_loop`` left.
    """
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = []
        for task in os.listdir(tasks):
            try:
                with open(f"{tasks}/{task}/comm") as handle:
                    names.append(handle.read())
            except OSError:  # the thread ended while we looked
                pass
        if not any("gloo" in name for name in names):
            return
        time.sleep(0.01)


def _local_world_size() -> int:
    """Ranks on this host: torchrun's (and pipegrid's launcher's) LOCAL_WORLD_SIZE, SLURM's tasks per node."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return int(os.environ.get("WORLD_SIZE", "1"))


def _one_visible_device_each() -> bool:
    """Whether CUDA_VISIBLE_DEVICES names one device: how SLURM's --gpus-per-task=1 (and
    per-rank wrappers) give each rank a GPU of its own, seen by the rank as device 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return bool(visible) and "," not in visible


def resolve_backend(requested: str, local_ranks: int | None = None) -> tuple[str, str | None]:
    """(backend, notice): ``comm.backend`` resolved for ``local_ranks`` ranks on this host.

    NCCL needs a GPU of its own for every rank. ``auto`` takes NCCL only where each
    local rank has one (as many visible GPUs as local ranks) and otherwise trains on
    the CPU over gloo, with a one-line notice saying why and how to change it: a laptop
    with one GPU runs the README's pipe=2 job instead of failing inside NCCL. An explicit
    ``nccl`` that cannot work is refused before any process group, naming the fix.
    """
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"comm.backend must be auto, gloo or nccl, got {requested!r}")
    if requested == "gloo":
        return "gloo", None
    local = _local_world_size() if local_ranks is None else local_ranks
    gpus = visible_gpu_count()  # through NVML: a launcher that asks may still fork
    if requested == "auto":
        if gpus == 0:
            return "gloo", None
        if gpus >= local:
            return "nccl", None
        return "gloo", (f"pipegrid: {local} ranks on this host but {gpus} visible GPU(s); NCCL needs a GPU "
                        "per rank, so this run trains on the CPU over gloo. Start at most "
                        f"{gpus} rank(s) per host, or set comm.backend=nccl if CUDA_VISIBLE_DEVICES gives "
                        "each rank its own GPU")
    if gpus == 0:
        raise RuntimeError("comm.backend=nccl needs CUDA, but torch sees no GPU "
                           "(torch.cuda.device_count() is 0); set comm.backend=gloo or auto")
    if gpus < local and not (gpus == 1 and _one_visible_device_each()):
        raise RuntimeError(f"comm.backend=nccl needs a GPU per rank, but {local} ranks share {gpus} visible "
                           f"GPU(s) on this host; start at most {gpus} rank(s) per host, give each rank its "
                           "own GPU through CUDA_VISIBLE_DEVICES, or set comm.backend=auto (gloo on the CPU)")
    return "nccl", None


def local_cuda_device() -> torch.device:
    """The GPU of this rank: cuda:LOCAL_RANK, or the one visible device when each rank sees only its own."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local < count:
        return torch.device("cuda", local)
    if count == 1:
        return torch.device("cuda", 0)
    raise RuntimeError(f"LOCAL_RANK={local} but this process sees {count} GPU(s); start at most {count} "
                       "rank(s) per host or make every GPU visible (CUDA_VISIBLE_DEVICES)")


def header_group(timeout_s: float) -> dist.ProcessGroup | None:
    """Collective: a gloo group for point-to-point message headers beside NCCL (None on gloo,
    where headers take a tag of their own). NCCL ignores tags, and a header must never sit in
    the data stream's order (``pipegrid.pipe.p2p``)."""
    if dist.get_backend() != "nccl":
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _join_process_group(cfg: TrainConfig) -> None:
    """Initialise torch.distributed from the environment (torchrun or the local launcher)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        if cfg.topology.pipe * cfg.topology.data * cfg.topology.tensor != 1:
            raise RuntimeError(
                "torch.distributed is not initialised and RANK/WORLD_SIZE are not set; start the job with "
                "torchrun --nproc-per-node N ... or pipegrid's local launcher (examples/train_gpt.py does it)")
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    check_world_size(Topology(**vars(cfg.topology)), int(os.environ["WORLD_SIZE"]))
    import_before_joining()
    backend, notice = resolve_backend(cfg.comm.backend)
    if notice and os.environ.get("LOCAL_RANK", "0") == "0":
        print(notice, file=sys.stderr, flush=True)
    # NCCL: bind the group to this rank's GPU now (eager init), so every transfer and
    # collective uses the one communicator the schedule's ordering was proven on
    device = {"device_id": local_cuda_device()} if backend == "nccl" else {}
    if device:
        torch.cuda.set_device(device["device_id"])
    init_method = os.environ.get("PIPEGRID_INIT_METHOD")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=cfg.comm.timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if init_method is None and restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store across restarts: give every attempt its own key space,
        # or a restarted group finds the dead attempt's addresses and never connects
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"pipegrid/attempt_{restart}", agent)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **device)
        return
    if init_method is None and "MASTER_ADDR" not in os.environ:
        import tempfile  # one process, no launcher: a private file store

        init_method = f"file://{tempfile.mkdtemp(prefix='pipegrid-')}/store"
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=timeout, **device)


def init_distributed(config: Any = None) -> ProcessGroups:
    """Join torch.distributed (if needed) and build the grid's process groups.

    Call it first when the model itself needs a group (tensor-parallel layers take
    ``groups.tensor_parallel_group``), then pass the groups to :func:`initialize`.
    """
    cfg = to_train_config(config)
    if cfg.comm.bind_cores:  # before joining, so gloo's threads start on this rank's cores
        bind_cores()
    if not dist.is_initialized():
        _join_process_group(cfg)
        atexit.unregister(_leave_process_group)  # once, however many jobs run in this process
        atexit.register(_leave_process_group)
    return ProcessGroups(Topology(**vars(cfg.topology)), timeout_s=cfg.comm.timeout_s)
