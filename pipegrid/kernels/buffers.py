"""Flat communication buffers: pack, unpack, views, norms and finite checks.

This is the API and the torch path, which is both the CPU implementation and the
reference the fused CuPy kernels (``cupy_kernels.py``) are tested against. Every
function takes ``backend="auto"|"torch"|"cupy"`` (config key ``kernels.backend``).

Packing and unpacking move data, not gradients: they run under ``torch.no_grad()``.

Numerics of ``pack(..., dtype=, scale=)``: each tensor is computed in float32 (float64
when it or the flat buffer is float64), multiplied by ``scale`` rounded to that
precision, and rounded once into the flat dtype, i.e. exactly
``(t.to(c) * scale).to(flat_dtype)``. Unpacking casts back with ``.to(dtype)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch

from pipegrid.kernels.backend import select_backend
from pipegrid.kernels.flat_layout import FlatLayout
from pipegrid.kernels.path_choice import process_choice
from pipegrid.kernels.segment_table import TableCache

__all__ = ["pack", "unpack", "views", "sum_of_squares", "all_finite", "FlatBuffer"]

Scale = float | torch.Tensor
_DEVICE = attrgetter("device")


# ---------------------------------------------------------------- checks and helpers

def _as_list(tensors: Sequence[torch.Tensor], what: str = "tensors") -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{what} must be a sequence of tensors, got one Tensor; wrap it in a list")
    return list(tensors)


def _device_of(tensors: Sequence[torch.Tensor], fallback: torch.Tensor | None = None) -> torch.device:
    """The one device all ``tensors`` (and ``fallback``) live on."""
    device = tensors[0].device if tensors else (fallback.device if fallback is not None
                                                else torch.device("cpu"))
    others = set(map(_DEVICE, tensors))  # one C-level pass: runs on every pack and unpack
    if fallback is not None:
        others.add(fallback.device)
    if others - {device}:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, others | {device}))}; "
                         "move them with .to(device) first")
    return device


def _check_flat(flat: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
    """Validate a caller's flat buffer and return its first ``layout.total`` elements."""
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat buffer must be a torch.Tensor, got {type(flat).__name__}")
    if flat.dim() != 1 or not flat.is_contiguous() or flat.dtype != layout.flat_dtype:
        raise ValueError(f"flat buffer must be a contiguous 1-D {layout.flat_dtype} tensor, got "
                         f"{flat.dtype}{list(flat.shape)} (contiguous={flat.is_contiguous()})")
    if flat.numel() < layout.total:
        raise ValueError(f"flat buffer holds {flat.numel()} elements but the layout needs "
                         f"{layout.total}; allocate FlatBuffer(layout) or pass out=None")
    if flat.data_ptr() % layout.alignment_bytes:
        raise ValueError(f"flat buffer starts at address {flat.data_ptr():#x}, not on a "
                         f"{layout.alignment_bytes}-byte boundary; slice buckets at multiples "
                         "of layout.total so every buffer stays aligned")
    return flat[: layout.total]


def _check_scale(scale: Scale | None, layout: FlatLayout) -> None:
    if scale is None:
        return
    if layout.is_bytes or not layout.flat_dtype.is_floating_point:
        raise ValueError(f"scale needs a floating flat buffer, got {layout.flat_dtype} "
                         f"({'a byte buffer of mixed dtypes' if layout.is_bytes else 'integer data'}); "
                         "pass dtype=torch.float32 with floating tensors, or scale=None")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"a tensor scale must hold one floating value, got "
                             f"{scale.dtype}{list(scale.shape)}")
    elif not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a one-element tensor, got {type(scale).__name__}")


def _allocate(layout: FlatLayout, device: torch.device, zero: bool) -> torch.Tensor:
    """A fresh flat buffer starting on an ``alignment_bytes`` boundary.

    Allocators align to 64 (CPU) or 512 (CUDA) bytes; larger alignments are met by
    over-allocating and slicing.
    """
    fill = torch.zeros if zero else torch.empty
    slack = layout.alignment_bytes // layout.flat_dtype.itemsize
    raw = fill(layout.total + slack, dtype=layout.flat_dtype, device=device)
    skip = (-raw.data_ptr() % layout.alignment_bytes) // layout.flat_dtype.itemsize
    return raw[skip: skip + layout.total]


_KERNEL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _path(backend: str, device: torch.device, layout: FlatLayout | None = None,
          floats: set[torch.dtype] | frozenset = frozenset()) -> str:
    """"torch", "cupy", or "auto" (both can run: measure per move); ``floats`` are dtypes
    the kernels must convert."""
    resolved = select_backend(backend, device)
    if resolved == "torch":
        return "torch"
    problem = None
    if layout is not None and layout.alignment_bytes % 16:
        problem = (f"the CuPy kernels move 16-byte words and need alignment_bytes to be a "
                   f"multiple of 16, got {layout.alignment_bytes}; use the default 16")
    elif not floats <= _KERNEL_FLOATS:
        problem = (f"the CuPy kernels convert float16/bfloat16/float32/float64 only, got "
                   f"{sorted(map(str, floats - _KERNEL_FLOATS))}; use kernels.backend=torch")
    if problem and backend == "cupy":
        raise ValueError(problem)
    return "torch" if problem else resolved


def _use_cupy(backend: str, device: torch.device, floats: set[torch.dtype] | frozenset = frozenset()) -> bool:
    """Whether the reductions run the CuPy kernels (under auto they do wherever CuPy can run)."""
    return _path(backend, device, None, floats) != "torch"


def _measured(path: str, op: str, device: torch.device, layout: FlatLayout, run, casts: bool) -> str:
    """``path``, with "auto" replaced by the path this process measured faster for such a move."""
    if path != "auto":
        return path
    return process_choice().choose(op, device, layout.nbytes, len(layout), run, "cast" if casts else "copy")


def _converted(layout: FlatLayout, scale: Scale | None) -> set[torch.dtype]:
    """Dtypes the pack/unpack kernels must convert (none for a plain bit copy)."""
    if scale is None and not layout.casts:
        return set()
    return layout.distinct_dtypes | {layout.flat_dtype}


def _cupy():  # imported lazily: CuPy is an optional extra and slow to import
    from pipegrid.kernels import cupy_kernels
    return cupy_kernels


def _compute_dtype(dtype: torch.dtype, flat_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (dtype, flat_dtype) else torch.float32


# ---------------------------------------------------------------- views

def views(flat: torch.Tensor, layout: FlatLayout) -> list[torch.Tensor]:
    """Zero-copy views of ``flat``, one per tensor, with the layout's shapes.

    Byte buffers give views in each tensor's own dtype; other buffers give views in
    the flat dtype (a casting layout cannot reinterpret its elements).
    """
    flat = _check_flat(flat, layout)
    if not layout.is_bytes:
        base = flat.storage_offset()
        return [torch.as_strided(flat, shape, stride, base + offset)
                for shape, stride, offset in zip(layout.shapes, layout.strides, layout.offsets)]
    typed = {d: flat.view(d) for d in set(layout.dtypes)}
    out = []
    for shape, stride, offset, dtype in zip(layout.shapes, layout.strides, layout.offsets, layout.dtypes):
        base = typed[dtype]
        out.append(torch.as_strided(base, shape, stride, base.storage_offset() + offset // dtype.itemsize))
    return out


# ---------------------------------------------------------------- torch path

def _pack_torch(tensors: list[torch.Tensor], dst: list[torch.Tensor], layout: FlatLayout,
                scale: Scale | None) -> None:
    """Copy (cast, scale) ``tensors`` into the views ``dst`` with foreach kernels."""
    if not tensors:
        return
    if scale is None:
        torch._foreach_copy_(dst, tensors)
        return
    flat_dtype = layout.flat_dtype
    if isinstance(scale, torch.Tensor):  # fp64 0-d on the device: rounded per tensor by promotion
        scale = scale.detach().to(device=dst[0].device if dst else None, dtype=torch.float64).reshape(())
    widening = all(torch.promote_types(d, flat_dtype) == flat_dtype for d in set(layout.dtypes))
    if flat_dtype in (torch.float32, torch.float64) and widening:
        torch._foreach_copy_(dst, tensors)  # exact, then scale in place in the compute dtype
        torch._foreach_mul_(dst, scale)
        return
    wide = [t.to(_compute_dtype(t.dtype, flat_dtype)) for t in tensors]
    torch._foreach_copy_(dst, torch._foreach_mul(wide, scale))


def _unpack_torch(src: list[torch.Tensor], layout: FlatLayout,
                  out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    if out is None:
        return [v.clone() if v.dtype == d else v.to(d) for v, d in zip(src, layout.dtypes)]
    if out:
        torch._foreach_copy_(out, src)
    return out


# ---------------------------------------------------------------- public API

@torch.no_grad()
def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None,
         dtype: torch.dtype | None = None, scale: Scale | None = None,
         layout: FlatLayout | None = None, backend: str = "auto") -> torch.Tensor:
    """Pack ``tensors`` into one flat 1-D buffer and return it (``out`` when given).

    ``layout`` skips rebuilding the layout (pass the one from ``FlatLayout.from_tensors``);
    ``dtype`` casts floating tensors into that dtype; ``scale`` multiplies them on the
    way (see the module docstring). Non-contiguous tensors are fine. Padding is zero
    in a buffer this allocates; in a caller's ``out`` it is unspecified (the torch path
    leaves it alone, the CuPy path writes zeros).
    """
    tensors = _as_list(tensors)
    if layout is None:
        layout = FlatLayout.from_tensors(tensors, dtype=dtype)
    else:
        if dtype is not None and dtype != layout.flat_dtype:
            raise ValueError(f"dtype={dtype} disagrees with layout.flat_dtype={layout.flat_dtype}; "
                             "pass one or the other")
        layout.check(tensors)
    _check_scale(scale, layout)
    device = _device_of(tensors, out)
    path = _path(backend, device, layout, _converted(layout, scale))
    if out is None:
        out = _allocate(layout, device, zero=layout.has_padding and path != "cupy")
    flat = _check_flat(out, layout)

    def run(chosen: str) -> None:
        if chosen == "cupy":
            _cupy().pack(tensors, flat, layout, scale)
        else:
            _pack_torch(tensors, views(flat, layout), layout, scale)
    run(_measured(path, "pack", device, layout, run, bool(_converted(layout, scale))))
    return out


@torch.no_grad()
def unpack(flat: torch.Tensor, like_or_layout: FlatLayout | Sequence[torch.Tensor],
           out: Sequence[torch.Tensor] | None = None, backend: str = "auto") -> list[torch.Tensor]:
    """Split ``flat`` back into tensors: fresh ones, or written into ``out`` in place.

    ``like_or_layout`` is the FlatLayout used to pack, or tensors shaped like the packed
    ones (their layout is rebuilt with ``dtype=flat.dtype`` and default alignment).
    """
    if isinstance(like_or_layout, FlatLayout):
        layout = like_or_layout
    else:
        layout = FlatLayout.from_tensors(_as_list(like_or_layout, "like"), dtype=flat.dtype)
    if out is not None:
        out = _as_list(out, "out")
        layout.check(out, "out")
    device = _device_of(out or [], flat)
    flat = _check_flat(flat, layout)

    def run(chosen: str) -> list[torch.Tensor]:
        if chosen == "cupy":
            return _cupy().unpack(flat, layout, out)
        return _unpack_torch(views(flat, layout), layout, out)
    converted = _converted(layout, None)
    return run(_measured(_path(backend, device, layout, converted), "unpack", device, layout, run, bool(converted)))


def _floating(tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    tensors = _as_list(tensors)
    bad = [i for i, t in enumerate(tensors) if not t.is_floating_point()]
    if bad:
        raise TypeError(f"{what} needs floating tensors, got {tensors[bad[0]].dtype} at index "
                        f"{bad[0]} ({len(bad)} non-floating in all); pass only gradients")
    return tensors


@torch.no_grad()
def sum_of_squares(tensors: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """Sum of squares of every element, as a 0-d float32 tensor (for global grad norms).

    Accumulates in float32 (float64 for float64 tensors); inf and nan propagate.
    """
    tensors = _floating(tensors, "sum_of_squares")
    device = _device_of(tensors)
    if _use_cupy(backend, device, {t.dtype for t in tensors}):
        return _cupy().sum_of_squares(tensors, device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for wide in (False, True):
        group = [t for t in tensors if (t.dtype == torch.float64) == wide and t.numel()]
        if group:
            norms = torch._foreach_norm(group, 2, dtype=torch.float64 if wide else torch.float32)
            total = total + torch.stack(norms).square().sum().to(torch.float32)
    return total


@torch.no_grad()
def all_finite(tensors: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """0-d bool tensor: True when no floating tensor holds an inf or a nan.

    Stays on the device (no host sync); call ``bool()`` on it when you must branch.
    Integer and bool tensors are finite by definition.
    """
    tensors = _as_list(tensors)
    device = _device_of(tensors)
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    if _use_cupy(backend, device, {t.dtype for t in tensors}):
        return _cupy().all_finite(tensors, device)
    # max |x| per tensor: inf for any inf, nan for any nan (the max propagates nan)
    return torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()


class FlatBuffer:
    """A preallocated flat buffer with a fixed layout, reused step after step.

    The buffer and its per-tensor views are made once; ``pack_from`` and
    ``unpack_to`` then move data without allocating (the CuPy path also reuses its
    device tables while the same tensors come back). Padding stays zero.
    """

    def __init__(self, layout: FlatLayout, device: torch.device | str | None = None,
                 backend: str = "auto") -> None:
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}; "
                            "build one with FlatLayout.from_tensors(tensors)")
        self.layout = layout
        self.device = torch.device("cpu" if device is None else device)
        # pack_from may scale any floating buffer, so check the kernels can convert it
        scalable = layout.casts or (layout.flat_dtype.is_floating_point and not layout.is_bytes)
        floats = layout.distinct_dtypes | {layout.flat_dtype} if scalable else set()
        self.backend = _path(backend, self.device, layout, floats)
        """"torch", "cupy", or "auto": each direction takes the path measured faster (path_choice.py)."""
        self.flat = _allocate(layout, self.device, zero=True)
        self._views = views(self.flat, layout)
        self._tables = TableCache()  # the CuPy path's device tables, by tensor addresses

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                     alignment_bytes: int = 16, backend: str = "auto") -> FlatBuffer:
        """A buffer laid out for ``tensors`` on their device (not filled; see pack_from)."""
        tensors = _as_list(tensors)
        layout = FlatLayout.from_tensors(tensors, dtype=dtype, alignment_bytes=alignment_bytes)
        return cls(layout, _device_of(tensors), backend)

    def views(self) -> list[torch.Tensor]:
        """Per-tensor views into the buffer (see ``views``); writes go straight in."""
        return list(self._views)

    @torch.no_grad()
    def pack_from(self, tensors: Sequence[torch.Tensor], scale: Scale | None = None) -> torch.Tensor:
        """Copy (cast, scale) ``tensors`` into the buffer and return ``self.flat``."""
        tensors = _as_list(tensors)
        self.layout.check(tensors)
        _check_scale(scale, self.layout)
        _device_of(tensors, self.flat)

        def run(chosen: str) -> None:
            if chosen == "cupy":
                _cupy().pack(tensors, self.flat, self.layout, scale, cache=self._tables)
            else:
                _pack_torch(tensors, self._views, self.layout, scale)
        run(_measured(self.backend, "pack", self.device, self.layout, run, bool(_converted(self.layout, scale))))
        return self.flat

    @torch.no_grad()
    def unpack_to(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the buffer out into ``tensors`` in place (any strides) and return them."""
        tensors = _as_list(tensors, "out")
        self.layout.check(tensors, "out")
        _device_of(tensors, self.flat)

        def run(chosen: str) -> list[torch.Tensor]:
            if chosen == "cupy":
                return _cupy().unpack(self.flat, self.layout, tensors, cache=self._tables)
            return _unpack_torch(self._views, self.layout, tensors)
        return run(_measured(self.backend, "unpack", self.device, self.layout, run, self.layout.casts))

    @torch.no_grad()
    def unpack(self) -> list[torch.Tensor]:
        """Fresh tensors holding the buffer's contents."""
        def run(chosen: str) -> list[torch.Tensor]:
            if chosen == "cupy":
                return _cupy().unpack(self.flat, self.layout, None)
            return _unpack_torch(self._views, self.layout, None)
        return run(_measured(self.backend, "unpack", self.device, self.layout, run, self.layout.casts))

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self.layout)} tensors, {self.layout.total} x "
                f"{self.layout.flat_dtype}, device={self.device}, backend={self.backend})")
