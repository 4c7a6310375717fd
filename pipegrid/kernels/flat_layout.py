"""FlatLayout: where each tensor lives inside one flat communication buffer.

A layout is pure metadata (shapes, dtypes, offsets), frozen and hashable, so the
engine can build it once per message or bucket, cache it and compare it across steps.

Flat dtype scheme
-----------------
* All tensors share a dtype and ``dtype`` is None (or equal): the flat buffer has
  that dtype; offsets count its elements.
* ``dtype`` is a floating dtype and every tensor is floating: the flat buffer has
  ``dtype`` and packing casts (and optionally scales) each tensor into it; the
  offsets count elements of ``dtype``.
* Mixed dtypes with ``dtype=None`` (e.g. fp32 activations + int64 ids + a bool mask
  in one message), or ``dtype=torch.uint8`` with any non-uint8 tensor: a *byte*
  buffer. Offsets count bytes and every tensor is bit-copied through
  ``.view(torch.uint8)``, so any dtype round-trips exactly. Casting and scaling are
  refused for byte buffers because they would reinterpret bits.

Every tensor starts on an ``alignment_bytes`` boundary (16 by default, the width of
a vectorised CUDA load) and the total is padded to a multiple of it, so buffers
placed back to back stay aligned. Padding is zero in buffers this module allocates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from math import prod
from operator import attrgetter

import numpy as np
import torch

__all__ = ["FlatLayout"]

_DTYPE = attrgetter("dtype")
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _resolve_flat_dtype(dtypes: Sequence[torch.dtype], dtype: torch.dtype | None) -> torch.dtype:
    """Pick the flat buffer dtype following the scheme in the module docstring."""
    distinct = set(dtypes)
    if dtype is None:
        if len(distinct) == 1:
            return dtypes[0]
        return torch.uint8  # empty or mixed: a byte buffer
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype == torch.uint8 or distinct <= {dtype}:
        return dtype
    bad = sorted(str(d) for d in distinct if d not in _CASTABLE)
    if dtype not in _CASTABLE or bad:
        raise ValueError(
            f"a flat buffer of {dtype} can hold casts of float16/bfloat16/float32/float64 "
            f"tensors only, got {bad or [str(dtype)]}; pass dtype=None to bit-copy mixed "
            "dtypes into a uint8 byte buffer, or cast the tensors first")
    return dtype


@dataclass(frozen=True)
class FlatLayout:
    """Shapes, dtypes and offsets of tensors packed into one flat 1-D buffer.

    ``offsets[i]`` is where tensor ``i`` starts, in elements of ``flat_dtype`` (bytes
    for a byte buffer); ``total`` is the buffer length in those elements, padding
    included. Two layouts are equal exactly when they describe the same buffer.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    flat_dtype: torch.dtype
    total: int
    alignment_bytes: int = 16

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                     alignment_bytes: int = 16) -> FlatLayout:
        """The layout that packs ``tensors`` in order (see the module docstring)."""
        if isinstance(tensors, torch.Tensor):
            raise TypeError("tensors must be a sequence of tensors, got one Tensor; wrap it in a list")
        # C-level passes over the tensors: the engine lays out gradient buckets of thousands
        shapes = tuple(map(tuple, map(torch.Tensor.size, tensors)))
        return cls._laid_out(shapes, tuple(map(_DTYPE, tensors)), list(map(torch.Tensor.numel, tensors)),
                             dtype, alignment_bytes)

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype],
                    dtype: torch.dtype | None = None, alignment_bytes: int = 16) -> FlatLayout:
        """The layout for tensors of these shapes and dtypes (e.g. negotiated by a receiver)."""
        if len(shapes) != len(dtypes):
            raise ValueError(f"got {len(shapes)} shapes but {len(dtypes)} dtypes; pass one dtype per shape")
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        return cls._laid_out(shapes, tuple(dtypes), [prod(s) for s in shapes], dtype, alignment_bytes)

    @classmethod
    def _laid_out(cls, shapes: tuple[tuple[int, ...], ...], dtypes: tuple[torch.dtype, ...], numels: list[int],
                  dtype: torch.dtype | None, alignment_bytes: int) -> FlatLayout:
        """Offsets: each tensor's slot rounded up to ``alignment_bytes``, slots end to end."""
        flat_dtype = _resolve_flat_dtype(dtypes, dtype)
        byte_scheme = flat_dtype == torch.uint8 and any(d != torch.uint8 for d in dtypes)
        flat_size = _itemsize(flat_dtype)
        _check_alignment(alignment_bytes, flat_size, dtypes if byte_scheme else ())
        align = alignment_bytes // flat_size
        extents = np.asarray(numels, dtype=np.int64).reshape(-1)
        if byte_scheme:
            extents = extents * np.fromiter(map(_itemsize, dtypes), dtype=np.int64, count=len(dtypes))
        slots = -(-extents // align) * align
        ends = np.cumsum(slots)
        total = int(ends[-1]) if len(ends) else 0
        return cls(shapes, dtypes, tuple((ends - slots).tolist()), flat_dtype, total, alignment_bytes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __hash__(self) -> int:  # cached: layouts of thousands of tensors key engine caches
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash((self.shapes, self.dtypes, self.offsets, self.flat_dtype, self.total,
                     self.alignment_bytes))

    @cached_property
    def is_bytes(self) -> bool:
        """True for a byte buffer: offsets in bytes, tensors bit-copied."""
        return self.flat_dtype == torch.uint8 and any(d != torch.uint8 for d in self.dtypes)

    @cached_property
    def casts(self) -> bool:
        """True when packing converts some tensor to ``flat_dtype``."""
        return not self.is_bytes and any(d != self.flat_dtype for d in self.dtypes)

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @cached_property
    def strides(self) -> tuple[tuple[int, ...], ...]:
        """Contiguous strides of each shape, in elements of the tensor's own dtype."""
        return tuple(torch.empty(s, device="meta").stride() for s in self.shapes)

    @cached_property
    def extents(self) -> tuple[int, ...]:
        """Elements of ``flat_dtype`` each tensor occupies, padding excluded."""
        if self.is_bytes:
            return tuple(n * _itemsize(d) for n, d in zip(self.numels, self.dtypes))
        return self.numels

    @property
    def nbytes(self) -> int:
        return self.total * _itemsize(self.flat_dtype)

    @cached_property
    def has_padding(self) -> bool:
        return sum(self.extents) != self.total

    @cached_property
    def _sizes(self) -> list[torch.Size]:
        return [torch.Size(s) for s in self.shapes]

    @cached_property
    def _dtypes(self) -> list[torch.dtype]:
        return list(self.dtypes)

    @cached_property
    def distinct_dtypes(self) -> frozenset[torch.dtype]:
        """Each dtype the layout holds, once (asked on every move: which kernels may run)."""
        return frozenset(self.dtypes)

    def check(self, tensors: Sequence[torch.Tensor], what: str = "tensors") -> None:
        """Raise ValueError unless ``tensors`` have this layout's shapes and dtypes.

        Called on every pack and unpack: the comparison runs as two C-level passes (dtypes,
        then sizes) and walks the tensors one by one only to name the first mismatch.
        """
        if isinstance(tensors, torch.Tensor):
            raise TypeError(f"{what} must be a sequence of tensors, got one Tensor; wrap it in a list")
        if len(tensors) != len(self.shapes):
            raise ValueError(f"layout holds {len(self.shapes)} tensors, got {len(tensors)} {what}")
        if list(map(_DTYPE, tensors)) == self._dtypes and list(map(torch.Tensor.size, tensors)) == self._sizes:
            return
        for i, (t, shape, dtype) in enumerate(zip(tensors, self.shapes, self.dtypes, strict=True)):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{what}[{i}] is {t.dtype}{list(t.shape)} but the layout expects "
                    f"{dtype}{list(shape)}; build a new layout with FlatLayout.from_tensors")


def _check_alignment(alignment_bytes: int, flat_size: int, byte_dtypes: Sequence[torch.dtype]) -> None:
    if not isinstance(alignment_bytes, int) or alignment_bytes <= 0:
        raise ValueError(f"alignment_bytes must be a positive int, got {alignment_bytes!r}")
    sizes = {flat_size} | {_itemsize(d) for d in byte_dtypes}
    bad = sorted(s for s in sizes if alignment_bytes % s)
    if bad:
        raise ValueError(
            f"alignment_bytes={alignment_bytes} must be a multiple of every element size "
            f"in the buffer, got sizes {bad}; use 16 (the default)")
