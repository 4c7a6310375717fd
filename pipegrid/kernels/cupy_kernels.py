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
from pipegrid.kernels.segment_table import (
    BLOCK, ELEMENT_TILE, Launch, TableCache, dense, plan_pack, plan_unpack, reduction_rows, shared_cache,
)

__all__ = [
    "pack", "unpack", "sum_of_squares", "all_finite",
    "torch_allocator", "use_torch_allocator", "as_cupy", "as_torch",
]



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


@functools.cache
def _module(device_index: int) -> cupy.RawModule:
    # Compiled once per device by NVRTC; CuPy also caches the binary on disk.
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=CUDA_SOURCE)


@functools.cache
def _kernel(name: str, device_index: int) -> cupy.RawKernel:
    with cupy.cuda.Device(device_index):
        return _module(device_index).get_function(name)


@functools.cache
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
        kernel((grid,), (BLOCK,), args)


# ---------------------------------------------------------------- pack and unpack

def _device_table(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a host table to ``device`` on the current stream, in one transfer.

    The pinned staging copy is kept alive by torch's host allocator until the
    asynchronous copy has run, so nothing here waits for the GPU.
    """
    return torch.from_numpy(host).pin_memory().to(device, non_blocking=True)


def _place(device: torch.device) -> tuple[int, int]:
    """Where a cached table may be read without waiting: its device, torch's current stream."""
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _run(launch: Launch | None, device: torch.device) -> None:
    # launch.keep_alive (the table, a scale) may go once this returns: the launch is enqueued,
    # and torch's allocator orders any reuse of that memory after it on this stream
    if launch is not None:
        _launch(launch.kernel, device, _grid(launch.units, launch.tile, device, 16), launch.args)


def pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor, layout: FlatLayout,
         scale: float | torch.Tensor | None = None, cache: TableCache | None = None) -> None:
    """Write ``tensors`` into ``flat`` (already checked against ``layout``) in one launch.

    ``cache`` holds this layout's device tables (a FlatBuffer's); without one the layout's
    shared cache serves, so moving the same storages again builds no table.
    """
    device = flat.device
    tables = shared_cache(layout) if cache is None else cache
    sources = dense(tensors)  # held until the launch is enqueued: dense copies of strided tensors
    _run(plan_pack(sources, flat, layout, scale, tables, _place(device),
                   functools.partial(_device_table, device=device)), device)


def unpack(flat: torch.Tensor, layout: FlatLayout, out: Sequence[torch.Tensor] | None = None,
           cache: TableCache | None = None) -> list[torch.Tensor]:
    """Copy ``flat`` out into ``out`` (or fresh tensors) in one launch."""
    device = flat.device
    if out is None:
        out = [torch.empty(s, dtype=d, device=device) for s, d in zip(layout.shapes, layout.dtypes, strict=True)]
    strided = not all(map(torch.Tensor.is_contiguous, out))
    targets = ([o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=device) for o in out]
               if strided else out)
    tables = shared_cache(layout) if cache is None else cache
    _run(plan_unpack(targets, flat, layout, tables, _place(device),
                     functools.partial(_device_table, device=device)), device)
    if strided:
        for o, t in zip(out, targets, strict=True):
            if o is not t:
                o.copy_(t)
    return list(out)


# ---------------------------------------------------------------- reductions

def _reduction_table(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple:
    """(table, sources, total): the non-empty tensors laid end to end, no padding."""
    sources = dense([t for t in tensors if t.numel()])
    if not sources:
        return None, sources, 0
    host = reduction_rows(sources)
    return _device_table(host, device), sources, int(host[2].sum())


def sum_of_squares(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all elements as a 0-d float32 tensor (checked floating inputs)."""
    table, sources, total = _reduction_table(tensors, device)
    if not total:
        return torch.zeros((), dtype=torch.float32, device=device)
    grid = _grid(total, ELEMENT_TILE, device, 4)  # one partial per block
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
    grid = _grid(total, ELEMENT_TILE, device, 4)
    flags = torch.empty(grid, dtype=torch.int32, device=device)
    args = (np.uint64(table.data_ptr()), np.int32(len(sources)), np.int64(total),
            np.uint64(flags.data_ptr()))
    _launch("find_nonfinite", device, grid, args)
    return flags.eq(0).all()
