"""``kernels.backend=auto`` on CUDA: the path, torch or CuPy, measured faster for this move.

Neither path wins everywhere. On an H200 (2026-12-04) the fused CuPy kernels packed 1000
small tensors 2-3x faster than ``torch.cat`` (one launch instead of one per tensor), yet
unpacked a 1 GB buffer at 68% of copy bandwidth against torch's split + ``copy_`` at 90%.
So ``auto`` measures: the first time a process packs (or unpacks) a buffer of a given
size class on a device, both paths run on that very buffer, alternating, and the faster
one is kept for every later move of that direction and class.

A size class is (bytes, tensors) rounded up to powers of two, and a bit copy is told apart
from a move that casts or scales (another kernel), so a training step's few buffer shapes
cost a handful of measurements in all. CuPy must beat torch by
``MARGIN`` to be taken: a tie (within timing noise) goes to torch, the reference path,
so ``auto`` is never meaningfully slower than torch. ``PathChoice.table()`` lists what was
measured (``benchmarks/gpu_check.sh`` prints it).
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["MARGIN", "PATHS", "Measured", "PathChoice", "cuda_timer", "process_choice", "size_class"]

PATHS = ("torch", "cupy")
MARGIN = 0.03
"""CuPy is taken only when at least 3% faster than torch (timing noise otherwise decides)."""

Timer = Callable[[Callable[[], object]], float]  # seconds one call of fn takes


def size_class(nbytes: int, tensors: int) -> tuple[int, int]:
    """(bytes, tensors), each rounded up to a power of two: moves that cost alike share a class."""
    return 1 << max(nbytes - 1, 0).bit_length(), 1 << max(tensors - 1, 0).bit_length()


def cuda_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes on the current CUDA stream (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@dataclass(frozen=True)
class Measured:
    """One decision: where, what, the seconds each path took (medians), and the pick."""

    device: str
    op: str
    kind: str
    nbytes: int
    tensors: int
    seconds: dict[str, float]
    path: str


class PathChoice:
    """Per-process record of which path moves each (device, op, size class) faster.

    ``timer`` times one call (``cuda_timer`` by default; tests pass fake clocks);
    ``repeats`` samples per path, taken alternately after one warm-up call of each
    (the warm-up compiles CuPy's kernels and fills torch's allocator).
    """

    def __init__(self, timer: Timer | None = None, repeats: int = 3) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.timer = timer or cuda_timer
        self.repeats = repeats
        self._choices: dict[tuple, Measured] = {}

    def choose(self, op: str, device: torch.device | str, nbytes: int, tensors: int,
               run: Callable[[str], object], kind: str = "copy") -> str:
        """"torch" or "cupy" for this move; measured with ``run(path)`` the first time its class is seen.

        ``run`` must be safe to repeat (a pack into the same buffer, an unpack into the
        same tensors): it is called ``repeats + 1`` times per path on a first sight. ``kind``
        tells moves that run different kernels apart ("copy": bits; "cast": dtype or scale).
        """
        if op not in ("pack", "unpack"):
            raise ValueError(f"op must be pack or unpack, got {op!r}")
        key = (str(device), op, kind, *size_class(nbytes, tensors))
        known = self._choices.get(key)
        if known is not None:
            return known.path
        seconds = self._measure(run)
        path = "cupy" if seconds["cupy"] < seconds["torch"] * (1 - MARGIN) else "torch"
        self._choices[key] = Measured(key[0], op, kind, key[3], key[4], seconds, path)
        logging.getLogger("pipegrid.kernels").debug(
            "kernels.backend=auto: %s (%s) of <= %d bytes in <= %d tensors on %s: torch %.1f us, cupy %.1f us -> %s",
            op, kind, key[3], key[4], key[0], seconds["torch"] * 1e6, seconds["cupy"] * 1e6, path)
        return path

    def _measure(self, run: Callable[[str], object]) -> dict[str, float]:
        samples: dict[str, list[float]] = {path: [] for path in PATHS}
        for path in PATHS:  # warm-up: CuPy's first launch compiles; torch's allocator fills
            run(path)
        for _ in range(self.repeats):  # alternating, so a slow moment of the machine hits both
            for path in PATHS:
                samples[path].append(self.timer(functools.partial(run, path)))
        return {path: statistics.median(times) for path, times in samples.items()}

    def table(self) -> list[Measured]:
        """Every decision so far, in the order they were made."""
        return list(self._choices.values())


@functools.cache
def process_choice() -> PathChoice:
    """The one PathChoice of this process, which ``pack``/``unpack``/``FlatBuffer`` consult under auto.

    Kept per process (like the CuPy probe): the device and the kernels do not change
    while training, and every buffer of a class benefits from one measurement.
    """
    return PathChoice()
