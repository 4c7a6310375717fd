"""The CUDA kernels of pipegrid/kernels/cuda_source.py, compiled as C++ and run on the CPU.

A small header maps CUDA's dialect onto plain C++ with one thread per block (so
``__syncthreads`` and shared memory need nothing), and each block of the grid runs in
turn. That checks what a kernel computes (segment lookup, tiles, grid-stride loops,
padding, tails, misaligned tensors, casts) against the torch path on any machine with a
C++ compiler, so a kernel edit is tested before a GPU sees it. The segment tables and
arguments come from the real host side (``segment_table.plan_pack``/``plan_unpack``), cached
tables included. What it cannot check is
speed and the real parallel execution (sum_squares' warp reduction among them): tests/gpu
does that. float16 conversions are inline PTX and are left out here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from pipegrid.kernels import FlatBuffer, FlatLayout, pack, unpack
from pipegrid.kernels.cuda_source import CUDA_SOURCE
from pipegrid.kernels.segment_table import TableCache, dense, plan_pack, plan_unpack, reduction_rows

COMPILER = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler (g++) to build the kernels for the CPU")

CUDA_AS_CPP = r"""
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define asm(...)
struct Dim { unsigned x = 0; };
static Dim threadIdx, blockIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
static inline void __syncthreads() {}
static inline int __syncthreads_or(int v) { return v; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
template <typename T> static inline T __shfl_down_sync(unsigned, T, int) { return T(); }  // one lane
"""
LAUNCH = r"""
extern "C" void set_block(unsigned index, unsigned grid) {
    threadIdx.x = 0; blockDim.x = 1; blockIdx.x = index; gridDim.x = grid;
}
"""
I64, PTR, INT, DOUBLE = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_double
SIGNATURES = {"pack_bytes": [PTR, INT, I64, PTR], "unpack_bytes": [PTR, INT, I64, PTR],
              "pack_cast": [PTR, INT, I64, PTR, INT, INT, DOUBLE, PTR], "unpack_cast": [PTR, INT, I64, PTR, INT],
              "find_nonfinite": [PTR, INT, I64, PTR]}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda_on_cpu")
    (folder / "kernels.cpp").write_text(CUDA_AS_CPP + CUDA_SOURCE + LAUNCH)
    library = folder / "kernels.so"
    subprocess.run([COMPILER, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", str(folder / "kernels.cpp"),
                    "-o", str(library)], check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(library))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.set_block.argtypes = [ctypes.c_uint, ctypes.c_uint]

    def launch(name: str, grid: int, *args) -> None:
        for block in range(grid):
            lib.set_block(block, grid)
            getattr(lib, name)(*args)
    return launch


def _plan(plan, *args, cache: TableCache | None = None):
    """What cupy_kernels launches, planned by the real host side; the table stays on the CPU."""
    return plan(*args, TableCache() if cache is None else cache, (None, 0), torch.from_numpy)


def _run(kernels, launch, grid: int = 3) -> None:
    kernels(launch.kernel, grid, *launch.args)


def _mixed(seed: int) -> list[torch.Tensor]:
    """Odd sizes, an empty tensor, integer and bool data, and views starting off a 16-byte boundary."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(300, generator=gen)
    return [torch.randn(7, generator=gen), torch.empty(0), base[1:38], torch.randint(-9, 9, (5, 3), generator=gen),
            torch.randn(64, generator=gen).to(torch.bfloat16), torch.rand(13, generator=gen) > 0.5,
            base[100:101], torch.randn(3, 17, generator=gen, dtype=torch.float64)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("grid", [1, 3, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_and_unpack_bytes_match_the_torch_path_bit_for_bit(kernels, grid, seed):
    tensors = _mixed(seed)
    layout = FlatLayout.from_tensors(tensors)
    assert layout.is_bytes
    flat = FlatBuffer(layout).flat
    flat.fill_(0xAB)  # padding must come out zero, as the CuPy path promises
    launch = _plan(plan_pack, dense(tensors), flat, layout, None)
    assert launch.kernel == "pack_bytes"
    _run(kernels, launch, grid)
    assert torch.equal(flat, pack(tensors, layout=layout, backend="torch"))
    outs = [torch.full_like(t, 0) for t in tensors]
    outs[2] = torch.zeros(40)[1:38]  # a misaligned destination
    launch = _plan(plan_unpack, outs, flat, layout)
    assert launch.kernel == "unpack_bytes"
    _run(kernels, launch, grid)
    for i, (got, want) in enumerate(zip(outs, tensors, strict=True)):
        assert torch.equal(_bits(got), _bits(want)), f"tensor {i}"


@pytest.mark.parametrize("flat_dtype,scale", [(torch.bfloat16, None), (torch.float32, 0.37), (torch.float64, 3.0),
                                              (torch.bfloat16, 1 / 3)])
def test_pack_cast_and_unpack_cast_match_the_torch_path(kernels, flat_dtype, scale):
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=gen, dtype=d) * 50 for n, d in
               ((5, torch.float32), (33, torch.float64), (0, torch.float32), (70, torch.bfloat16), (1, torch.float32))]
    tensors[1][3] = float("nan")
    layout = FlatLayout.from_tensors(tensors, dtype=flat_dtype)
    flat = FlatBuffer(layout).flat
    flat.fill_(7)
    _run(kernels, _plan(plan_pack, tensors, flat, layout, scale))
    want = pack(tensors, layout=layout, scale=scale, backend="torch")
    torch.testing.assert_close(flat, want, rtol=0, atol=0, equal_nan=True)
    outs = [torch.empty_like(t) for t in tensors]
    _run(kernels, _plan(plan_unpack, outs, flat, layout))
    for got, expected in zip(outs, unpack(want, layout, backend="torch"), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_the_finite_check(kernels):
    # (sum_squares reduces over warps of 32 threads, which one thread per block cannot stand in for)
    gen = torch.Generator().manual_seed(9)
    tensors = [torch.randn(n, generator=gen, dtype=d) for n, d in
               ((100, torch.float32), (7, torch.float64), (65, torch.bfloat16))]
    table = torch.from_numpy(reduction_rows(tensors))  # as cupy_kernels lays out the reductions
    total, grid = sum(t.numel() for t in tensors), 4
    flags = torch.full((grid,), 7, dtype=torch.int32)
    kernels("find_nonfinite", grid, table.data_ptr(), len(tensors), total, flags.data_ptr())
    assert flags.eq(0).all()
    for bad in (float("inf"), float("nan")):
        tensors[2][64] = bad
        kernels("find_nonfinite", grid, table.data_ptr(), len(tensors), total, flags.data_ptr())
        assert flags.sum() == 1
        tensors[2][64] = 0.0


def test_a_cached_table_follows_new_storages(kernels):
    """The same storages reuse one table; a tensor with a new storage gets a new one, so
    the kernel reads the new data, never the old address."""
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=gen) for n in (5, 40, 1, 17)]
    layout = FlatLayout.from_tensors(tensors)
    cache, flat = TableCache(), FlatBuffer(layout).flat
    for _ in range(2):
        _run(kernels, _plan(plan_pack, tensors, flat, layout, None, cache=cache))
    assert cache.builds == 1 and torch.equal(flat, pack(tensors, layout=layout, backend="torch"))
    tensors[2] = torch.full((1,), 7.0)  # a new storage: the old one may be freed and reused
    _run(kernels, _plan(plan_pack, tensors, flat, layout, None, cache=cache))
    assert cache.builds == 2 and torch.equal(flat, pack(tensors, layout=layout, backend="torch"))
    outs = [torch.zeros_like(t) for t in tensors]
    for target in (outs, [torch.zeros_like(t) for t in tensors]):  # out tensors: same rule
        _run(kernels, _plan(plan_unpack, target, flat, layout, cache=cache))
        assert all(torch.equal(got, want) for got, want in zip(target, tensors, strict=True))
    assert cache.builds == 4


@pytest.fixture
def cupy_kernels_on_cpu(kernels, monkeypatch):
    """pipegrid.kernels.cupy_kernels imported against a CuPy whose kernels are the C++ build
    above and a torch whose stream, device properties and pinned copy answer as on a GPU:
    the module's own host code (tables, cache, launch arguments, strided tensors) runs as is."""
    import contextlib
    import importlib
    import sys
    import types

    import pipegrid.kernels as package

    nothing = contextlib.nullcontext
    module = types.SimpleNamespace(get_function=lambda name: lambda grid, block, args: kernels(name, grid[0], *args))
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda *a: nothing(), using_allocator=lambda *a: nothing(),
                                      Stream=types.SimpleNamespace(from_external=lambda stream: nothing()))
    cupy.RawModule = lambda code: module
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    stream = types.SimpleNamespace(cuda_stream=0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    properties = types.SimpleNamespace(multi_processor_count=2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
    sys.modules.pop("pipegrid.kernels.cupy_kernels", None)
    yield importlib.import_module("pipegrid.kernels.cupy_kernels")
    sys.modules.pop("pipegrid.kernels.cupy_kernels", None)
    if hasattr(package, "cupy_kernels"):
        delattr(package, "cupy_kernels")


def test_cupy_kernels_host_code_end_to_end(cupy_kernels_on_cpu):
    ck = cupy_kernels_on_cpu
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=gen)
    tensors = [torch.randn(33, generator=gen), base.t(), torch.randint(0, 9, (7,), generator=gen), base[:, 2]]
    layout = FlatLayout.from_tensors(tensors)  # mixed dtypes: bit copies; two strided inputs
    buffer = FlatBuffer(layout)
    cache = TableCache()
    for step in range(3):
        if step == 2:
            tensors[0] = torch.randn(33, generator=gen)  # a new storage, a new table
        ck.pack(tensors, buffer.flat, layout, cache=cache)
        assert torch.equal(buffer.flat, pack(tensors, layout=layout, backend="torch")), step
    # (the strided inputs' dense copies are new tensors each call, wherever the allocator puts them)
    outs = [torch.empty_like(t) for t in tensors[:1]] + [torch.zeros(6, 5).t(), torch.empty(7, dtype=torch.int64),
                                                         torch.zeros(6, 3)[:, 1]]
    assert ck.unpack(buffer.flat, layout, outs, cache=cache) == outs
    fresh = ck.unpack(buffer.flat, layout)
    for got, again, want in zip(outs, fresh, tensors, strict=True):
        assert torch.equal(got, want) and torch.equal(again, want)
    grads = [torch.randn(40, generator=gen), torch.randn(3, 3, generator=gen, dtype=torch.float64)]
    cast = FlatLayout.from_tensors(grads, dtype=torch.bfloat16)
    flat = FlatBuffer(cast).flat
    for scale in (0.25, torch.tensor(0.25, dtype=torch.float64)):  # a host number, a device tensor
        flat.zero_()
        ck.pack(grads, flat, cast, scale=scale)
        assert torch.equal(flat, pack(grads, layout=cast, scale=0.25, backend="torch"))
    for got, want in zip(ck.unpack(flat, cast), unpack(flat, cast, backend="torch"), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert ck.all_finite(grads, torch.device("cpu")).item() is True
    grads[1][2, 1] = float("nan")
    assert ck.all_finite(grads, torch.device("cpu")).item() is False
