"""Joining torch.distributed from torchrun's (or the local launcher's) environment, and
leaving it cleanly at exit: what :func:`pipegrid.initialize` does before it builds the grid."""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.conf.schema import TrainConfig, to_train_config
from pipegrid.topology.affinity import bind_cores
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups, check_world_size

__all__ = ["import_before_joining", "init_distributed"]


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
    backend = cfg.comm.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return
    if init_method is None and "MASTER_ADDR" not in os.environ:
        import tempfile  # one process, no launcher: a private file store

        init_method = f"file://{tempfile.mkdtemp(prefix='pipegrid-')}/store"
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=timeout)


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
