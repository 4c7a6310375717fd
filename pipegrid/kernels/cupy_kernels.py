"""Fused CUDA kernels for flat buffers, compiled and launched through CuPy.

Imported lazily by ``buffers.py`` only for CUDA tensors when CuPy can run. One launch
packs (or unpacks) any number of tensors from a device table of addresses, sizes and
offsets; the dtype cast and the scale are fused into it; sum of squares and the
finite check are one launch each plus a tiny deterministic torch reduction.

Zero copies: kernels read and write torch tensors in place through their device
addresses (``data_ptr``), and ``as_cupy``/``as_torch`` exchange arrays through
DLPack. Kernels run on torch's current stream, and anything CuPy allocates while they
run comes from torch's caching allocator (``torch_allocator``), so there is one pool.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import cupy
import numpy as np
import torch

from pipegrid.kernels.cuda_source import CUDA_SOURCE
from pipegrid.kernels.flat_layout import FlatLayout

__all__ = [
    "pack", "unpack", "sum_of_squares", "all_finite",
    "torch_allocator", "use_torch_allocator", "as_cupy", "as_torch",
]

_BLOCK = 256
_UNROLL = 4  # must match UNROLL in cuda_source.py
_BYTE_TILE = _BLOCK * 16 * _UNROLL  # bytes a block moves per tile (16 per thread per step)
_ELEMENT_TILE = _BLOCK * _UNROLL
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_TABLE_CACHE_SIZE = 4


# ---------------------------------------------------------------- memory and streams

class _TorchBlock:
    """Owner of one block from torch's caching allocator; frees it when CuPy drops it."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        torch.cuda.caching_allocator_delete(self.ptr)


def torch_allocator(nbytes: int) -> cupy.cuda.MemoryPointer:
    """A CuPy allocator (``cupy.cuda.set_allocator`` signature) backed by torch's pool.

    The block is allocated on torch's current stream; use it from CuPy on that same
    stream (as this module does) or torch may hand it out again too early.
    """
    device_id = cupy.cuda.runtime.getDevice()
    if nbytes == 0:
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device_id), 0)
    stream = torch.cuda.current_stream(device_id)
    ptr = torch.cuda.caching_allocator_alloc(nbytes, device_id, stream)
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, _TorchBlock(ptr), device_id)
    return cupy.cuda.MemoryPointer(memory, 0)


def use_torch_allocator() -> None:
    """Route every CuPy allocation in this process through torch's caching allocator."""
    cupy.cuda.set_allocator(torch_allocator)


def as_cupy(tensor: torch.Tensor) -> cupy.ndarray:
    """A CuPy array sharing ``tensor``'s memory (DLPack, no copy)."""
    return cupy.from_dlpack(tensor)


def as_torch(array: cupy.ndarray) -> torch.Tensor:
    """A torch tensor sharing ``array``'s memory (DLPack, no copy)."""
    return torch.from_dlpack(array)


def _cupy_stream(device: torch.device) -> Any:
    """CuPy's view of torch's current stream on ``device``."""
    stream = torch.cuda.current_stream(device)
    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14: CUDA stream protocol
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


@functools.lru_cache(maxsize=None)
def _module(device_index: int) -> cupy.RawModule:
    # Compiled once per device by NVRTC; CuPy also caches the binary on disk.
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=CUDA_SOURCE)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int) -> cupy.RawKernel:
    with cupy.cuda.Device(device_index):
        return _module(device_index).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(units: int, tile: int, device: torch.device, blocks_per_sm: int) -> int:
    """Blocks for ``units``: one tile each, capped so blocks loop over tiles (grid-stride)."""
    return max(1, min(-(-units // tile), blocks_per_sm * _sm_count(device.index)))


def _launch(name: str, device: torch.device, grid: int, args: tuple) -> None:
    """Launch kernel ``name`` on torch's current stream, CuPy allocating from torch."""
    kernel = _kernel(name, device.index)
    with ExitStack() as scope:
        scope.enter_context(cupy.cuda.Device(device.index))
        scope.enter_context(_cupy_stream(device))
        scope.enter_context(cupy.cuda.using_allocator(torch_allocator))
        kernel((grid,), (_BLOCK,), args)


# ---------------------------------------------------------------- segment tables

def _device_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Copy an int64 (4, n) table to ``device`` on the current stream.

    The pinned staging copy is kept alive by torch's host allocator until the
    asynchronous copy has run, so nothing here waits for the GPU.
    """
    host = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return host.pin_memory().to(device, non_blocking=True)


def _table(kind: str, tensors: Sequence[torch.Tensor], starts: Sequence[int],
           counts: Sequence[int], device: torch.device, cache: dict | None) -> torch.Tensor:
    """The segment table for ``tensors``, reused from ``cache`` (one per FlatBuffer, so
    one layout) when the same tensors, by address, come back on the same stream."""
    ptrs = [t.data_ptr() for t in tensors]
    key = (kind, torch.cuda.current_stream(device).cuda_stream, tuple(ptrs))
    if cache is not None and key in cache:
        return cache[key]
    codes = [_DTYPE_CODES.get(t.dtype, 0) for t in tensors]
    table = _device_table([list(starts), ptrs, list(counts), codes], device)
    if cache is not None:
        while len(cache) >= _TABLE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = table
    return table


def _contiguous(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # Kernels address tensors as dense arrays; strided ones are densified first.
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _scale_args(scale: float | torch.Tensor | None, device: torch.device) -> tuple:
    """(has_scale, value, address, keep_alive) for the pack_cast kernel."""
    if scale is None:
        return np.int32(0), np.float64(0.0), np.uint64(0), None
    if isinstance(scale, torch.Tensor):  # stays on the device: no host sync
        on_device = scale.detach().to(device=device, dtype=torch.float64).reshape(())
        return np.int32(1), np.float64(0.0), np.uint64(on_device.data_ptr()), on_device
    return np.int32(1), np.float64(scale), np.uint64(0), None


# ---------------------------------------------------------------- the four operations

def pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor, layout: FlatLayout,
         scale: float | torch.Tensor | None = None, cache: dict | None = None) -> None:
    """Write ``tensors`` into ``flat`` (already checked against ``layout``) in one launch."""
    if layout.total == 0:
        return
    device = flat.device
    sources = _contiguous(tensors)
    n = np.int32(len(sources))
    if scale is None and not layout.casts:  # bit copy, 16 bytes per thread
        size = layout.flat_dtype.itemsize
        starts = [o * size for o in layout.offsets]
        counts = [e * size for e in layout.extents]
        table = _table("bytes", sources, starts, counts, device, cache)
        args = (np.uint64(table.data_ptr()), n, np.int64(layout.nbytes), np.uint64(flat.data_ptr()))
        _launch("pack_bytes", device, _grid(layout.nbytes, _BYTE_TILE, device, 16), args)
        return
    table = _table("elements", sources, layout.offsets, layout.numels, device, cache)
    has_scale, value, address, keep_alive = _scale_args(scale, device)
    args = (np.uint64(table.data_ptr()), n, np.int64(layout.total), np.uint64(flat.data_ptr()),
            np.int32(_DTYPE_CODES[layout.flat_dtype]), has_scale, value, address)
    _launch("pack_cast", device, _grid(layout.total, _ELEMENT_TILE, device, 16), args)
    del keep_alive  # the launch is enqueued; torch's allocator orders reuse on this stream


def unpack(flat: torch.Tensor, layout: FlatLayout, out: Sequence[torch.Tensor] | None = None,
           cache: dict | None = None) -> list[torch.Tensor]:
    """Copy ``flat`` out into ``out`` (or fresh tensors) in one launch."""
    device = flat.device
    if out is None:
        out = [torch.empty(s, dtype=d, device=device) for s, d in zip(layout.shapes, layout.dtypes)]
    targets = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=device)
               for o in out]
    if layout.total:
        n = np.int32(len(targets))
        if not layout.casts:
            size = layout.flat_dtype.itemsize
            starts = [o * size for o in layout.offsets]
            counts = [e * size for e in layout.extents]
            table = _table("bytes", targets, starts, counts, device, cache)
            args = (np.uint64(table.data_ptr()), n, np.int64(layout.nbytes), np.uint64(flat.data_ptr()))
            _launch("unpack_bytes", device, _grid(layout.nbytes, _BYTE_TILE, device, 16), args)
        else:
            table = _table("elements", targets, layout.offsets, layout.numels, device, cache)
            args = (np.uint64(table.data_ptr()), n, np.int64(layout.total),
                    np.uint64(flat.data_ptr()), np.int32(_DTYPE_CODES[layout.flat_dtype]))
            _launch("unpack_cast", device, _grid(layout.total, _ELEMENT_TILE, device, 16), args)
    for o, t in zip(out, targets):
        if o is not t:
            o.copy_(t)
    return list(out)


def _reduction_table(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple:
    """(table, sources, total): the non-empty tensors laid end to end, no padding."""
    sources = _contiguous([t for t in tensors if t.numel()])
    starts, total = [], 0
    for t in sources:
        starts.append(total)
        total += t.numel()
    if not sources:
        return None, sources, 0
    rows = [starts, [t.data_ptr() for t in sources], [t.numel() for t in sources],
            [_DTYPE_CODES[t.dtype] for t in sources]]
    return _device_table(rows, device), sources, total


def sum_of_squares(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all elements as a 0-d float32 tensor (checked floating inputs)."""
    table, sources, total = _reduction_table(tensors, device)
    if not total:
        return torch.zeros((), dtype=torch.float32, device=device)
    grid = _grid(total, _ELEMENT_TILE, device, 4)  # one partial per block
    partial_f = torch.empty(grid, dtype=torch.float32, device=device)
    partial_d = torch.empty(grid, dtype=torch.float64, device=device)
    args = (np.uint64(table.data_ptr()), np.int32(len(sources)), np.int64(total),
            np.uint64(partial_f.data_ptr()), np.uint64(partial_d.data_ptr()))
    _launch("sum_squares", device, grid, args)
    return (partial_f.sum() + partial_d.sum()).to(torch.float32)


def all_finite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool tensor: no inf and no nan in any (floating) tensor; no host sync."""
    table, sources, total = _reduction_table(tensors, device)
    if not total:
        return torch.ones((), dtype=torch.bool, device=device)
    grid = _grid(total, _ELEMENT_TILE, device, 4)
    flags = torch.empty(grid, dtype=torch.int32, device=device)
    args = (np.uint64(table.data_ptr()), np.int32(len(sources)), np.int64(total),
            np.uint64(flags.data_ptr()))
    _launch("find_nonfinite", device, grid, args)
    return flags.eq(0).all()
