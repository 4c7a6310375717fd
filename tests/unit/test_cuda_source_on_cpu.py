"""The CUDA kernels of pipegrid/kernels/cuda_source.py, compiled as C++ and run on the CPU.

A small header maps CUDA's dialect onto plain C++ with one thread per block (so
``__syncthreads`` and shared memory need nothing), and each block of the grid runs in
turn. That checks what a kernel computes (segment lookup, tiles, grid-stride loops,
padding, tails, misaligned tensors, casts) against the torch path on any machine with a
C++ compiler, so a kernel edit is tested before a GPU sees it. What it cannot check is
speed and the real parallel execution (sum_squares' warp reduction among them): tests/gpu
does that. float16 conversions are inline PTX and are left out here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipegrid.kernels import FlatBuffer, FlatLayout, pack, unpack
from pipegrid.kernels.cuda_source import CUDA_SOURCE

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
CODES = {torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}  # cupy_kernels._DTYPE_CODES but float16


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


def _table(rows: list[list[int]]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(-1).copy())


def _byte_table(tensors: list[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
    """As cupy_kernels.pack builds it for a bit copy: byte starts, addresses, byte counts, codes."""
    size = layout.flat_dtype.itemsize
    return _table([[o * size for o in layout.offsets], [t.data_ptr() for t in tensors],
                   [e * size for e in layout.extents], [0] * len(tensors)])


def _element_table(tensors: list[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
    return _table([list(layout.offsets), [t.data_ptr() for t in tensors], list(layout.numels),
                   [CODES[t.dtype] for t in tensors]])


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
    kernels("pack_bytes", grid, _byte_table(tensors, layout).data_ptr(), len(tensors), layout.nbytes, flat.data_ptr())
    assert torch.equal(flat, pack(tensors, layout=layout, backend="torch"))
    outs = [torch.full_like(t, 0) for t in tensors]
    outs[2] = torch.zeros(40)[1:38]  # a misaligned destination
    table = _byte_table(outs, layout)
    kernels("unpack_bytes", grid, table.data_ptr(), len(outs), layout.nbytes, flat.data_ptr())
    for i, (got, want) in enumerate(zip(outs, tensors)):
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
    has_scale = scale is not None
    kernels("pack_cast", 3, _element_table(tensors, layout).data_ptr(), len(tensors), layout.total, flat.data_ptr(),
            CODES[flat_dtype], int(has_scale), float(scale or 0.0), 0)
    want = pack(tensors, layout=layout, scale=scale, backend="torch")
    torch.testing.assert_close(flat, want, rtol=0, atol=0, equal_nan=True)
    outs = [torch.empty_like(t) for t in tensors]
    kernels("unpack_cast", 3, _element_table(outs, layout).data_ptr(), len(outs), layout.total, flat.data_ptr(),
            CODES[flat_dtype])
    for got, expected in zip(outs, unpack(want, layout, backend="torch")):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_the_finite_check(kernels):
    # (sum_squares reduces over warps of 32 threads, which one thread per block cannot stand in for)
    gen = torch.Generator().manual_seed(9)
    tensors = [torch.randn(n, generator=gen, dtype=d) for n, d in
               ((100, torch.float32), (7, torch.float64), (65, torch.bfloat16))]
    starts = np.cumsum([0] + [t.numel() for t in tensors[:-1]]).tolist()
    table = _table([starts, [t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                    [CODES[t.dtype] for t in tensors]])
    total, grid = sum(t.numel() for t in tensors), 4
    flags = torch.full((grid,), 7, dtype=torch.int32)
    kernels("find_nonfinite", grid, table.data_ptr(), len(tensors), total, flags.data_ptr())
    assert flags.eq(0).all()
    for bad in (float("inf"), float("nan")):
        tensors[2][64] = bad
        kernels("find_nonfinite", grid, table.data_ptr(), len(tensors), total, flags.data_ptr())
        assert flags.sum() == 1
        tensors[2][64] = 0.0
