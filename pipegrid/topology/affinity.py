"""Bind each local rank's threads to its own share of the host's cores.

Two pipeline ranks on one host hand messages to each other's gloo progress thread;
unbound, the kernel runs the receiver's progress thread on the sender's core (it was
the waker), so every send stalls the sender and migrates work between cores. Bound,
each rank's threads stay on its cores. DeepSpeed's launcher offers the same as
``--bind_cores_to_rank``; here it is on by default (``comm.bind_cores``).
"""

from __future__ import annotations

import os

__all__ = ["cores_for", "bind_cores"]


def cores_for(local_rank: int, local_world: int, pool: list[int]) -> list[int] | None:
    """The slice of ``pool`` (sorted core ids) that ``local_rank`` of ``local_world`` gets.

    None when the pool has fewer cores than ranks (oversubscribed: binding would only
    stack ranks up) or there is nothing to split.
    """
    if not 0 <= local_rank < local_world or len(pool) < local_world or local_world < 1:
        return None
    per = len(pool) // local_world
    return pool[local_rank * per:(local_rank + 1) * per]


def bind_cores(environ: dict[str, str] | None = None) -> list[int] | None:
    """Bind every thread of this process (and those it starts later) to this rank's cores.

    Reads LOCAL_RANK and LOCAL_WORLD_SIZE (torchrun and pipegrid's launcher set both);
    returns the cores, or None where it left the process alone (no such variables, one
    rank on the host, too few cores, or no ``sched_setaffinity`` on this platform).
    """
    env = os.environ if environ is None else environ
    if not hasattr(os, "sched_setaffinity") or "LOCAL_RANK" not in env or "LOCAL_WORLD_SIZE" not in env:
        return None
    local_rank, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    if local_world < 2:
        return None
    cores = cores_for(local_rank, local_world, sorted(os.sched_getaffinity(0)))
    if cores is None:
        return None
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    return cores
