"""The fused CuPy kernels against the torch path, on fresh random CUDA data."""

from __future__ import annotations

import math

import pytest
import torch

cupy = pytest.importorskip("cupy")

from pipegrid.kernels import (  # noqa: E402
    FlatBuffer, FlatLayout, all_finite, pack, sum_of_squares, unpack, views,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not cupy.cuda.is_available(),
                       reason="needs CUDA visible to both torch and CuPy"),
]

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ALL = FLOATS + (torch.int64, torch.int32, torch.uint8, torch.bool)
SIZES = (0, 1, 3, 7, 15, 16, 17, 255, 1000, 4097, 65537, 1 << 20)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _random(numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen, device="cuda").bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, (numel,), generator=gen, device="cuda",
                             dtype=torch.int64).to(dtype)
    return (torch.randn(numel, generator=gen, device="cuda", dtype=torch.float64) * 50).to(dtype)


def _tensors(seed: int, count: int, dtypes) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    picks = torch.randint(0, len(SIZES), (count,), generator=torch.Generator().manual_seed(seed))
    out = []
    for i, pick in enumerate(picks.tolist()):
        t = _random(SIZES[pick], dtypes[i % len(dtypes)], gen)
        out.append(t.reshape(-1, 1) if i % 3 == 0 else t)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtypes", [ALL, FLOATS, (torch.float32,), (torch.bfloat16,), (torch.bool,)])
def test_pack_and_unpack_match_torch_bit_for_bit(seed: int, dtypes) -> None:
    tensors = _tensors(seed, 40, dtypes)
    layout = FlatLayout.from_tensors(tensors)
    fused = pack(tensors, layout=layout, backend="cupy")
    reference = pack(tensors, layout=layout, backend="torch")
    assert torch.equal(_bits(fused), _bits(reference))  # padding included
    for got, want in zip(unpack(fused, layout, backend="cupy"), tensors):
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("flat_dtype", FLOATS)
@pytest.mark.parametrize("scale", [None, 0.37, "tensor"])
def test_cast_and_scale_match_torch(flat_dtype: torch.dtype, scale) -> None:
    if scale == "tensor":
        scale = torch.tensor(1 / 3, device="cuda", dtype=torch.float64)
    tensors = _tensors(11, 30, FLOATS)
    if tensors[1].numel():
        tensors[1].view(-1)[0] = float("nan")
    layout = FlatLayout.from_tensors(tensors, dtype=flat_dtype)
    fused = pack(tensors, layout=layout, scale=scale, backend="cupy")
    reference = pack(tensors, layout=layout, scale=scale, backend="torch")
    torch.testing.assert_close(fused, reference, rtol=0, atol=0, equal_nan=True)
    for got, want in zip(unpack(fused, layout, backend="cupy"), unpack(reference, layout, backend="torch")):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_non_contiguous_and_misaligned_tensors() -> None:
    base = torch.randn(64, 33, device="cuda")
    tensors = [base.t(), base[:, ::4], base.view(-1)[1:1000], base.view(-1)[3:4],
               torch.arange(10, device="cuda")[1:]]  # [1:] starts off a 16-byte boundary
    layout = FlatLayout.from_tensors(tensors, dtype=torch.uint8)
    fused = pack(tensors, layout=layout, backend="cupy")
    assert torch.equal(fused, pack(tensors, layout=layout, backend="torch"))
    outs = [torch.empty(64, 33, device="cuda").t(), torch.empty(64, 36, device="cuda")[:, :9],
            torch.empty(1000, device="cuda")[1:], torch.empty(1, device="cuda"),
            torch.empty(10, dtype=torch.int64, device="cuda")[1:]]
    unpack(fused, layout, out=outs, backend="cupy")
    for got, want in zip(outs, tensors):
        assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_sum_of_squares_and_all_finite_match_torch(seed: int) -> None:
    tensors = _tensors(seed, 50, FLOATS)
    fused, reference = sum_of_squares(tensors, backend="cupy"), sum_of_squares(tensors, backend="torch")
    assert fused.dtype == torch.float32 and fused.device.type == "cuda"
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    assert all_finite(tensors, backend="cupy").item() is True
    big = [t for t in tensors if t.numel() > 100]
    for bad in (float("inf"), float("-inf"), float("nan")):
        poisoned = [t.clone() for t in big]
        target = poisoned[seed % len(poisoned)]
        target.view(-1)[torch.randint(0, target.numel(), ()).item()] = bad
        assert all_finite(poisoned, backend="cupy").item() is False
        total = sum_of_squares(poisoned, backend="cupy").item()
        assert math.isnan(total) if math.isnan(bad) else total == math.inf


def test_runs_on_torchs_current_stream_and_reuses_tables() -> None:
    tensors = _tensors(5, 200, (torch.float32, torch.float16))
    buffer = FlatBuffer.from_tensors(tensors, backend="cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            buffer.pack_from(tensors)
        outs = [torch.empty_like(t) for t in tensors]
        buffer.unpack_to(outs)
    torch.cuda.current_stream().wait_stream(side)
    for got, want in zip(outs, tensors):
        assert torch.equal(got, want)
    for view, want in zip(buffer.views(), tensors):
        assert torch.equal(view, want)


def test_cupy_allocates_from_torch_and_shares_memory_through_dlpack() -> None:
    from pipegrid.kernels import cupy_kernels

    before = torch.cuda.memory_allocated()
    with cupy.cuda.using_allocator(cupy_kernels.torch_allocator):
        array = cupy.zeros(1 << 20, dtype=cupy.float32)
    assert torch.cuda.memory_allocated() >= before + (4 << 20)
    del array
    assert torch.cuda.memory_allocated() == before
    flat = pack([torch.ones(8, device="cuda")], backend="cupy")
    cupy_kernels.as_cupy(flat)[0] = 5
    assert flat[0].item() == 5.0
    assert cupy_kernels.as_torch(cupy_kernels.as_cupy(flat)).data_ptr() == flat.data_ptr()
    assert views(flat, FlatLayout.from_tensors([flat[:8]]))[0].data_ptr() == flat.data_ptr()


def test_auto_takes_the_measured_faster_path_per_direction_and_matches_torch() -> None:
    from pipegrid.kernels.path_choice import process_choice

    for count in (3, 300):  # two size classes
        tensors = _tensors(21 + count, count, (torch.float32, torch.bfloat16))
        layout = FlatLayout.from_tensors(tensors)
        flat = pack(tensors, layout=layout, backend="auto")
        assert torch.equal(_bits(flat), _bits(pack(tensors, layout=layout, backend="torch")))
        buffer = FlatBuffer(layout, "cuda", backend="auto")
        assert buffer.backend == "auto"
        outs = [torch.empty_like(t) for t in tensors]
        buffer.pack_from(tensors)
        for got, want in zip(buffer.unpack_to(outs) + unpack(flat, layout, backend="auto"), tensors + tensors):
            assert torch.equal(_bits(got), _bits(want))
    moves = {(m.op, m.tensors) for m in process_choice().table()}
    assert {("pack", 4), ("unpack", 4), ("pack", 512), ("unpack", 512)} <= moves
    assert all(m.path in ("torch", "cupy") and m.seconds["torch"] > 0 for m in process_choice().table())
