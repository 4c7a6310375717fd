"""Host side of the fused flat-buffer kernels: segment tables and launch arguments, built once.

Every kernel in ``cuda_source.py`` walks a table of int64 rows, n entries each: starts,
addresses, counts, dtype codes. All but the addresses follow from the FlatLayout, so they
are built once per (layout, unit) as a NumPy template (``template``). A call takes the
tensors' addresses in one pass (``addresses``), and ``TableCache`` hands back the device
table it already holds for those addresses on that stream, or fills a copy of the template
and moves it to the device in one transfer. A hit is the common case: a FlatBuffer packs the
same gradient storages every step, and torch's caching allocator tends to give a stage's
activations the same addresses step after step.

No CuPy and no CUDA here (``cupy_kernels.py`` passes in how a table reaches the device), so
the CPU tests and ``benchmarks/kernel_host_cost.py`` run all of it on any machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipegrid.kernels.flat_layout import FlatLayout

__all__ = ["BLOCK", "DTYPE_CODES", "UNROLL", "Launch", "TableCache", "addresses", "dense",
           "plan_pack", "plan_unpack", "reduction_rows", "shared_cache", "template"]

BLOCK = 256
UNROLL = 4  # must match UNROLL in cuda_source.py
BYTE_TILE = BLOCK * 16 * UNROLL  # bytes a block moves per tile (16 per thread per step)
ELEMENT_TILE = BLOCK * UNROLL
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
UNITS = ("bytes", "elements")
"""What a table counts: bytes (bit copies, 16 per thread) or elements (casts and scales)."""

ToDevice = Callable[[np.ndarray], torch.Tensor]
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


@functools.lru_cache(maxsize=256)
def template(layout: FlatLayout, unit: str) -> np.ndarray:
    """The (4, n) int64 table of ``layout`` with zeros where the addresses go; read-only.

    Rows: starts (where tensor s begins in the iteration space), addresses, counts (units of
    tensor s; its slot runs on to the next start, padding), dtype codes (0 where no kernel
    converts that dtype: bit copies only).
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "bytes":
        size = layout.flat_dtype.itemsize
        starts = np.asarray(layout.offsets, dtype=np.int64) * size
        counts = np.asarray(layout.extents, dtype=np.int64) * size
    else:
        starts = np.asarray(layout.offsets, dtype=np.int64)
        counts = np.asarray(layout.numels, dtype=np.int64)
    codes = np.fromiter(map(DTYPE_CODES.get, layout.dtypes, (0,) * len(layout)), dtype=np.int64,
                        count=len(layout))
    rows = np.stack([starts, np.zeros(len(layout), dtype=np.int64), counts, codes])
    rows.setflags(write=False)
    return rows


def addresses(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Each tensor's ``data_ptr()`` as one int64 array (one C-level pass, no Python loop)."""
    return np.fromiter(map(_DATA_PTR, tensors), dtype=np.int64, count=len(tensors))


def dense(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as the kernels address them: dense arrays; strided ones are copied first."""
    if all(map(_IS_CONTIGUOUS, tensors)):
        return list(tensors)
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def reduction_rows(sources: Sequence[torch.Tensor]) -> np.ndarray:
    """The (4, n) table of the reductions (sum of squares, finite check): dense floating
    ``sources`` laid end to end in elements, no padding, no layout (built per call)."""
    counts = np.fromiter(map(torch.Tensor.numel, sources), dtype=np.int64, count=len(sources))
    starts = np.cumsum(counts) - counts
    codes = np.fromiter((DTYPE_CODES[t.dtype] for t in sources), dtype=np.int64, count=len(sources))
    return np.stack([starts, addresses(sources), counts, codes])


class TableCache:
    """Device tables of one layout, by (unit, place, addresses); the ``capacity`` newest kept.

    ``place`` says where a table may be read without waiting: (device index, stream), since
    its host-to-device copy is ordered only on the stream that made it. A table depends on
    nothing else: the layout is fixed per cache, and shapes and dtypes are checked against it
    before a table is asked for, so new storages (new addresses) are exactly what rebuilds.
    """

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.builds = 0
        """Tables built so far (misses): what the tests and the benchmark read."""
        self._tables: dict[tuple, torch.Tensor] = {}

    def get(self, layout: FlatLayout, unit: str, ptrs: np.ndarray, place: Hashable,
            to_device: ToDevice) -> torch.Tensor:
        """The table of ``layout`` in ``unit`` with these addresses, built and kept on a miss."""
        key = (unit, place, ptrs.tobytes())
        table = self._tables.get(key)
        if table is None:
            host = template(layout, unit).copy()
            host[1] = ptrs
            table = to_device(host)
            while len(self._tables) >= self.capacity:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = table
            self.builds += 1
        return table

    def __len__(self) -> int:
        return len(self._tables)


@functools.lru_cache(maxsize=64)
def shared_cache(layout: FlatLayout) -> TableCache:
    """The cache ``pack``/``unpack`` use without a FlatBuffer: one per recent layout (p2p
    messages keep theirs per message shape, so their tables come back while addresses do)."""
    return TableCache()


# ---------------------------------------------------------------- launches

@dataclass(frozen=True)
class Launch:
    """One kernel launch, planned on the host: what ``cupy_kernels._launch`` runs."""

    kernel: str
    """Name of the kernel in cuda_source.py."""
    units: int
    """Size of the iteration space (bytes or elements), for the grid."""
    tile: int
    """Units one block moves per tile."""
    args: tuple
    """The kernel's arguments as NumPy scalars, as CuPy passes them."""
    keep_alive: Any = None
    """Tensors the launch reads that nothing else holds until it is enqueued (the table, a scale)."""


def _scale_args(scale: float | torch.Tensor | None, device: torch.device) -> tuple:
    """(has_scale, value, address, keep_alive) for the pack_cast kernel."""
    if scale is None:
        return np.int32(0), np.float64(0.0), np.uint64(0), None
    if isinstance(scale, torch.Tensor):  # stays on the device: no host sync
        on_device = scale.detach().to(device=device, dtype=torch.float64).reshape(())
        return np.int32(1), np.float64(0.0), np.uint64(on_device.data_ptr()), on_device
    return np.int32(1), np.float64(scale), np.uint64(0), None


def plan_pack(sources: Sequence[torch.Tensor], flat: torch.Tensor, layout: FlatLayout,
              scale: float | torch.Tensor | None, tables: TableCache, place: Hashable,
              to_device: ToDevice) -> Launch | None:
    """The launch writing dense ``sources`` (checked against ``layout``) into ``flat``; None if empty."""
    if layout.total == 0:
        return None
    n = np.int32(len(sources))
    ptrs = addresses(sources)
    if scale is None and not layout.casts:  # bit copy, 16 bytes per thread
        table = tables.get(layout, "bytes", ptrs, place, to_device)
        args = (np.uint64(table.data_ptr()), n, np.int64(layout.nbytes), np.uint64(flat.data_ptr()))
        return Launch("pack_bytes", layout.nbytes, BYTE_TILE, args, table)
    table = tables.get(layout, "elements", ptrs, place, to_device)
    has_scale, value, address, on_device = _scale_args(scale, flat.device)
    args = (np.uint64(table.data_ptr()), n, np.int64(layout.total), np.uint64(flat.data_ptr()),
            np.int32(DTYPE_CODES[layout.flat_dtype]), has_scale, value, address)
    return Launch("pack_cast", layout.total, ELEMENT_TILE, args, (table, on_device))


def plan_unpack(targets: Sequence[torch.Tensor], flat: torch.Tensor, layout: FlatLayout,
                tables: TableCache, place: Hashable, to_device: ToDevice) -> Launch | None:
    """The launch copying ``flat`` out into dense ``targets``; None if there is nothing to move."""
    if layout.total == 0:
        return None
    n = np.int32(len(targets))
    ptrs = addresses(targets)
    if not layout.casts:
        table = tables.get(layout, "bytes", ptrs, place, to_device)
        args = (np.uint64(table.data_ptr()), n, np.int64(layout.nbytes), np.uint64(flat.data_ptr()))
        return Launch("unpack_bytes", layout.nbytes, BYTE_TILE, args, table)
    table = tables.get(layout, "elements", ptrs, place, to_device)
    args = (np.uint64(table.data_ptr()), n, np.int64(layout.total), np.uint64(flat.data_ptr()),
            np.int32(DTYPE_CODES[layout.flat_dtype]))
    return Launch("unpack_cast", layout.total, ELEMENT_TILE, args, table)
