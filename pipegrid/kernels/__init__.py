"""Flat communication buffers: pack/unpack/cast/scale/norm/finite-check.

The torch path (``buffers.py``) runs everywhere and is the reference; fused CuPy
kernels (``cupy_kernels.py``, imported lazily) take over for CUDA tensors when CuPy
is installed (``pip install "pipegrid[cuda12]"`` or ``[cuda13]``). See ``flat_layout.py`` for the buffer scheme.
"""

from pipegrid.kernels.backend import BACKENDS, select_backend
from pipegrid.kernels.buffers import FlatBuffer, all_finite, pack, sum_of_squares, unpack, views
from pipegrid.kernels.flat_layout import FlatLayout

__all__ = [
    "BACKENDS",
    "FlatBuffer",
    "FlatLayout",
    "all_finite",
    "pack",
    "select_backend",
    "sum_of_squares",
    "unpack",
    "views",
]
