"""GPUs on this host, counted without initialising CUDA, and whether this process already has:
a launcher may fork its workers only while CUDA is untouched (invariant 8).

A forked child inherits its parent's CUDA state but not the driver's threads and context,
so its first CUDA call fails ("CUDA error: initialization error"), even in a run that
trains on the CPU: torch's own optimizer step asks CUDA whether a graph is being captured.
``torch.cuda.is_available()`` is such a call (it runs ``cudaGetDeviceCount``, which
initialises the driver); ``torch.cuda.device_count()`` asks NVML first and does not.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["visible_gpu_count", "cuda_initialised", "refuse_fork_after_cuda", "hide_gpus", "HIDE_GPUS_ENV"]

# What a worker that trains on the CPU gets in its environment: no GPU to touch by accident.
HIDE_GPUS_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def visible_gpu_count() -> int:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES respected), counted through NVML.

    Counting initialises nothing while NVML answers. Where it cannot (no NVML library, MIG
    UUIDs), torch falls back to the CUDA runtime, which initialises the driver: the launcher
    then sees :func:`cuda_initialised` and spawns its workers instead of forking them.
    """
    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()


def cuda_initialised() -> bool:
    """Whether this process has initialised CUDA: through torch, or by a raw driver call
    (``torch.cuda.is_available()``, a CuPy or Triton probe), which leaves the driver library
    mapped into the process although torch's own flag stays unset."""
    if not torch.backends.cuda.is_built():
        return False
    if torch.cuda.is_initialized():
        return True
    return _driver_mapped()


def _driver_mapped() -> bool:
    """Whether libcuda is loaded into this process (Linux: /proc/self/maps names it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any("libcuda.so" in line for line in maps)
    except OSError:
        return False


def refuse_fork_after_cuda(what: str) -> None:
    """Raise before ``what`` forks workers from a process that has initialised CUDA."""
    if cuda_initialised():
        raise RuntimeError(
            f"{what}: CUDA is already initialised in this process (e.g. by torch.cuda.is_available() or a "
            "tensor on a GPU), and a forked worker's first CUDA call would fail with 'CUDA error: "
            "initialization error'. Start the workers with start_method='spawn', or make the first CUDA "
            "call inside the workers (torch.cuda.device_count() counts GPUs without initialising CUDA)")


def hide_gpus() -> None:
    """In a fresh worker that trains on the CPU: make every later CUDA query see no device."""
    os.environ.update(HIDE_GPUS_ENV)
