"""Flat buffers on the torch path: bit-exact round trips, cast/scale, norms, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from pipegrid.kernels import (
    BACKENDS, FlatBuffer, FlatLayout, all_finite, pack, select_backend, sum_of_squares, unpack,
    views,
)
from pipegrid.kernels import backend as backend_module

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(-2**40, 2**40, shape, generator=gen, dtype=torch.int64).to(dtype)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    if t.numel() >= 3:  # special values must survive bit for bit too
        t.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    return t


def _mixed(count: int, seed: int = 0, dtypes=(torch.float32, torch.bfloat16, torch.float16,
                                              torch.int64, torch.bool)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (0,), (1,), (3, 5), (7,), (2, 0, 3), (4, 4, 2), (33,)]
    return [_random(shapes[i % len(shapes)], dtypes[(i * 7 + seed) % len(dtypes)], gen)
            for i in range(count)]


CASES = {
    "mixed": _mixed(12),
    "fp32": _mixed(9, dtypes=(torch.float32,)),
    "bf16": _mixed(9, dtypes=(torch.bfloat16,)),
    "fp16": _mixed(9, dtypes=(torch.float16,)),
    "int64": _mixed(9, dtypes=(torch.int64,)),
    "bool": _mixed(9, dtypes=(torch.bool,)),
    "one": [torch.randn(5, 3)],
    "zero_size_only": [torch.empty(0), torch.empty(3, 0, dtype=torch.int64)],
    "scalar": [torch.tensor(1.5)],
    "empty": [],
    "thousands": _mixed(2000, seed=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_bit_exact(name: str) -> None:
    tensors = CASES[name]
    layout = FlatLayout.from_tensors(tensors)
    flat = pack(tensors)
    assert flat.dim() == 1 and flat.dtype == layout.flat_dtype and flat.numel() == layout.total
    for got, want in zip(unpack(flat, layout), tensors, strict=True):
        assert_bit_equal(got, want)
    for got, want in zip(views(flat, layout), tensors, strict=True):
        assert_bit_equal(got, want)
        assert got.data_ptr() % 16 == 0
    outs = [torch.empty_like(t) for t in tensors]
    assert unpack(flat, tensors, out=outs) == outs  # `like` tensors instead of a layout
    for got, want in zip(outs, tensors):
        assert_bit_equal(got, want)


def test_layout_scheme() -> None:
    same = FlatLayout.from_tensors([torch.zeros(3), torch.zeros(2, 2)])
    assert same.flat_dtype == torch.float32 and same.offsets == (0, 4) and same.total == 8
    assert not same.is_bytes and not same.casts and same.has_padding
    mixed = FlatLayout.from_tensors([torch.zeros(3), torch.zeros(2, dtype=torch.int64),
                                     torch.zeros(5, dtype=torch.bool)])
    assert mixed.flat_dtype == torch.uint8 and mixed.is_bytes
    assert mixed.offsets == (0, 16, 32) and mixed.total == 48 and mixed.nbytes == 48
    cast = FlatLayout.from_tensors([torch.zeros(3), torch.zeros(3).half()], dtype=torch.bfloat16)
    assert cast.casts and cast.offsets == (0, 8) and cast.total == 16
    explicit = FlatLayout.from_tensors([torch.zeros(3)], dtype=torch.uint8)
    assert explicit.is_bytes and explicit.total == 16
    assert FlatLayout.from_tensors([]).total == 0


def test_layout_is_hashable_and_comparable() -> None:
    tensors = _mixed(6)
    a, b = FlatLayout.from_tensors(tensors), FlatLayout.from_tensors([t.clone() for t in tensors])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a == FlatLayout.from_shapes([t.shape for t in tensors], [t.dtype for t in tensors])
    assert a != FlatLayout.from_tensors(tensors, alignment_bytes=64)
    assert a != FlatLayout.from_tensors(tensors[:-1])


@pytest.mark.parametrize("alignment", [16, 64, 256])
def test_every_view_is_aligned(alignment: int) -> None:
    for tensors in (_mixed(40, seed=5), _mixed(40, dtypes=(torch.float16,))):
        layout = FlatLayout.from_tensors(tensors, alignment_bytes=alignment)
        assert layout.nbytes % alignment == 0
        flat = pack(tensors, layout=layout)
        assert all(v.data_ptr() % alignment == 0 for v in views(flat, layout))


def test_padding_is_zero_and_out_is_used() -> None:
    tensors = [torch.full((3,), 7.0), torch.full((1,), 9.0)]
    flat = pack(tensors)
    assert flat.tolist() == [7.0, 7.0, 7.0, 0.0, 9.0, 0.0, 0.0, 0.0]
    out = torch.full((20,), -1.0)
    assert pack(tensors, out=out) is out
    assert out[:3].tolist() == [7.0] * 3 and out[4].item() == 9.0 and out[8:].eq(-1).all()


def test_non_contiguous_inputs_and_outputs() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = [base.t(), base[:, ::3], base[1:2].expand(4, 10), torch.arange(10)[::2]]
    assert not any(t.is_contiguous() for t in tensors[:3])
    flat = pack(tensors)
    for got, want in zip(unpack(flat, FlatLayout.from_tensors(tensors)), tensors):
        assert_bit_equal(got, want.contiguous())
    outs = [torch.zeros(6, 10).t(), torch.zeros(6, 8)[:, ::2], torch.zeros(4, 10),
            torch.zeros(10, dtype=torch.int64)[::2]]
    unpack(flat, FlatLayout.from_tensors(tensors), out=outs)
    for got, want in zip(outs, tensors):
        assert torch.equal(got, want)


def _reference_cast(t: torch.Tensor, flat_dtype: torch.dtype, scale) -> torch.Tensor:
    compute = torch.float64 if torch.float64 in (t.dtype, flat_dtype) else torch.float32
    wide = t.to(compute)
    if scale is not None:
        wide = wide * (scale.to(compute) if isinstance(scale, torch.Tensor) else scale)
    return wide.to(flat_dtype)


@pytest.mark.parametrize("flat_dtype", FLOATS)
@pytest.mark.parametrize("scale", [None, 0.37, 1024.0, "tensor"])
def test_cast_and_scale_match_eager_torch(flat_dtype: torch.dtype, scale) -> None:
    if scale == "tensor":
        scale = torch.tensor(3.3e-3, dtype=torch.float64)
    tensors = _mixed(16, seed=7, dtypes=FLOATS)
    layout = FlatLayout.from_tensors(tensors, dtype=flat_dtype)
    flat = pack(tensors, dtype=flat_dtype, scale=scale)
    for view, t in zip(views(flat, layout), tensors):
        torch.testing.assert_close(view, _reference_cast(t, flat_dtype, scale),
                                   rtol=0, atol=0, equal_nan=True)
    for back, view, t in zip(unpack(flat, layout), views(flat, layout), tensors):
        torch.testing.assert_close(back, view.to(t.dtype), rtol=0, atol=0, equal_nan=True)


def test_scale_without_cast_matches_eager_torch() -> None:
    for dtype in FLOATS:
        tensors = _mixed(5, seed=2, dtypes=(dtype,))
        flat = pack(tensors, scale=0.1)
        for view, t in zip(views(flat, FlatLayout.from_tensors(tensors)), tensors):
            torch.testing.assert_close(view, _reference_cast(t, dtype, 0.1), rtol=0, atol=0,
                                       equal_nan=True)


def test_flat_buffer_is_reused() -> None:
    tensors = _mixed(30, seed=11)
    buffer = FlatBuffer.from_tensors(tensors)
    address = buffer.flat.data_ptr()
    for step in range(3):
        step_tensors = _mixed(30, seed=11 + 100 * step)
        step_tensors = [s if s.dtype == t.dtype else t for s, t in zip(step_tensors, tensors)]
        assert buffer.pack_from(step_tensors) is buffer.flat
        assert buffer.flat.data_ptr() == address
        for got, want in zip(buffer.views(), step_tensors):
            assert_bit_equal(got, want)
        outs = [torch.empty_like(t) for t in step_tensors]
        assert buffer.unpack_to(outs) == outs
        for got, want, fresh in zip(outs, step_tensors, buffer.unpack()):
            assert_bit_equal(got, want)
            assert_bit_equal(fresh, want)
    index = next(i for i, v in enumerate(buffer.views()) if v.dtype == torch.float32 and v.numel())
    buffer.views()[index].fill_(5.0)  # views alias the buffer
    assert buffer.unpack()[index].eq(5.0).all()


def test_flat_buffer_casts_and_scales() -> None:
    grads = [torch.randn(100), torch.randn(7, 3)]
    buffer = FlatBuffer(FlatLayout.from_tensors(grads, dtype=torch.bfloat16))
    buffer.pack_from(grads, scale=0.5)
    for view, g in zip(buffer.views(), grads):
        assert torch.equal(view, (g * 0.5).bfloat16())
    outs = [torch.empty_like(g) for g in grads]
    buffer.unpack_to(outs)
    assert torch.equal(outs[0], (grads[0] * 0.5).bfloat16().float())


def _reference_sum_of_squares(tensors) -> float:
    return float(sum(t.double().square().sum() for t in tensors))


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float16), FLOATS])
def test_sum_of_squares(dtypes) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=gen).to(dtypes[n % len(dtypes)])
               for n in (0, 1, 17, 1000, 4099)]
    result = sum_of_squares(tensors)
    assert result.dtype == torch.float32 and result.dim() == 0
    torch.testing.assert_close(result.double(), torch.tensor(_reference_sum_of_squares(tensors),
                                                             dtype=torch.float64), rtol=1e-5, atol=0)
    assert sum_of_squares([]).item() == 0.0 and sum_of_squares([torch.empty(0)]).item() == 0.0
    many = [torch.randn(3, generator=gen) for _ in range(2000)]
    assert sum_of_squares(many).item() == pytest.approx(_reference_sum_of_squares(many), rel=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_values(dtype: torch.dtype) -> None:
    clean = [torch.randn(50).to(dtype), torch.randn(3, 3).to(dtype), torch.arange(4)]
    assert all_finite(clean).item() is True
    assert all_finite(clean).dtype == torch.bool and all_finite(clean).dim() == 0
    for bad in (float("inf"), float("-inf"), float("nan")):
        poisoned = [t.clone() for t in clean]
        poisoned[1][2, 1] = bad
        assert all_finite(poisoned).item() is False
        total = sum_of_squares(poisoned[:2]).item()
        assert math.isnan(total) if math.isnan(bad) else total == float("inf")
    big = [torch.full((4,), torch.finfo(dtype).max, dtype=dtype)]  # squares overflow, values do not
    assert all_finite(big).item() is True
    assert all_finite([]).item() is True and all_finite([torch.empty(0)]).item() is True


def test_select_backend() -> None:
    assert BACKENDS == ("auto", "torch", "cupy")
    assert select_backend("auto", "cpu") == "torch" and select_backend("torch", "cuda:0") == "torch"
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*kernels.backend=auto"):
        select_backend("cupy", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        select_backend("triton", "cpu")


def test_cupy_backend_without_cuda_is_a_clear_error(monkeypatch) -> None:
    tensors = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="kernels.backend=cupy needs CUDA tensors"):
        pack(tensors, backend="cupy")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        sum_of_squares(tensors, backend="cupy")
    reason = backend_module.cupy_unavailable_reason.__wrapped__
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend_module.importlib.util, "find_spec", lambda name: None)
    message = reason()
    assert "pip install \"pipegrid[cuda12]\"" in message
    monkeypatch.setattr(backend_module, "cupy_unavailable_reason", lambda: message)
    with pytest.raises(RuntimeError, match=r"cannot run: CuPy is not installed.*pipegrid\[cuda12\].*cuda13"):
        select_backend("cupy", "cuda:0")
    assert select_backend("auto", "cuda:0") == "torch"


def test_misuse_errors_name_the_fix() -> None:
    tensors = [torch.randn(3), torch.randn(2, 2)]
    layout = FlatLayout.from_tensors(tensors)
    with pytest.raises(ValueError, match=r"tensors\[1\] is torch.float32\[2, 3\].*from_tensors"):
        pack([tensors[0], torch.randn(2, 3)], layout=layout)
    with pytest.raises(ValueError, match="layout holds 2 tensors, got 1"):
        pack(tensors[:1], layout=layout)
    with pytest.raises(ValueError, match="scale needs a floating flat buffer"):
        pack([torch.randn(3), torch.arange(3)], scale=2.0)
    with pytest.raises(ValueError, match="dtype=None to bit-copy"):
        pack([torch.randn(3), torch.arange(3)], dtype=torch.float32)
    with pytest.raises(ValueError, match="contiguous 1-D torch.float32"):
        pack(tensors, out=torch.empty(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs 8"):
        pack(tensors, out=torch.empty(7))
    with pytest.raises(ValueError, match="16-byte boundary"):
        pack(tensors, out=torch.empty(9)[1:])
    with pytest.raises(ValueError, match="multiple of every element size"):
        FlatLayout.from_tensors([torch.randn(3), torch.arange(2)], alignment_bytes=4)
    with pytest.raises(ValueError, match="one device"):
        pack([torch.randn(3), torch.randn(3, device="meta")])
    with pytest.raises(TypeError, match="wrap it in a list"):
        pack(torch.randn(3))
    with pytest.raises(TypeError, match="needs floating tensors"):
        sum_of_squares([torch.arange(3)])
    with pytest.raises(ValueError, match="disagrees with layout"):
        pack(tensors, layout=layout, dtype=torch.float16)


def test_auto_falls_back_to_torch_on_cuda_saying_why_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backend_module, "cupy_unavailable_reason", lambda: "CuPy is not installed; install it")
    backend_module._say_fallback.cache_clear()
    with caplog.at_level("WARNING", logger="pipegrid.kernels"):
        assert select_backend("auto", "cuda:0") == "torch"
        assert select_backend("auto", "cuda:1") == "torch"
    said = [r.getMessage() for r in caplog.records if r.name == "pipegrid.kernels"]
    assert said == ["kernels.backend=auto uses the torch path for CUDA tensors: CuPy is not installed; install it"]


def test_a_cupy_that_cannot_run_a_kernel_is_named(monkeypatch) -> None:
    class BrokenCupy:  # what a CuPy built for another CUDA major (or without NVRTC) does
        int64 = "int64"

        class cuda:
            @staticmethod
            def is_available() -> bool:
                return True

        @staticmethod
        def arange(*args, **kwargs):
            raise RuntimeError("nvrtc: error: failed to load builtins for compute_90")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "cupy", BrokenCupy)
    reason = backend_module.cupy_unavailable_reason.__wrapped__()
    assert "cannot compile or run a kernel (RuntimeError: nvrtc: error" in reason and "cuda13" in reason
