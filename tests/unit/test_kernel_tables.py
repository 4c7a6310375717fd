"""The fused kernels' host side (pipegrid/kernels/segment_table.py): segment tables built once
per layout and reused while the same storages come back, on any machine (no CuPy, no CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipegrid.kernels import FlatBuffer, FlatLayout
from pipegrid.kernels.segment_table import (
    DTYPE_CODES, TableCache, addresses, dense, plan_pack, plan_unpack, shared_cache, template,
)

PLACE = (None, 0)  # (device index, stream) as cupy_kernels gives it; any hashable here


def _tables(cache: TableCache, layout: FlatLayout, tensors, place=PLACE, unit: str = "bytes") -> torch.Tensor:
    return cache.get(layout, unit, addresses(tensors), place, torch.from_numpy)


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in (3, 0, 16, 5)] + [torch.randn(2, 3, generator=gen)]


def test_the_template_holds_everything_but_the_addresses() -> None:
    tensors = [torch.randn(3), torch.ones(5, dtype=torch.int64), torch.ones(2, dtype=torch.bfloat16)]
    layout = FlatLayout.from_tensors(tensors)  # mixed dtypes: a byte buffer, offsets in bytes
    rows = template(layout, "bytes")
    assert rows.dtype == np.int64 and rows.shape == (4, 3) and not rows.flags.writeable
    assert rows[0].tolist() == list(layout.offsets) == [0, 16, 64]
    assert rows[1].tolist() == [0, 0, 0]
    assert rows[2].tolist() == [12, 40, 4]
    assert rows[3].tolist() == [DTYPE_CODES[torch.float32], 0, DTYPE_CODES[torch.bfloat16]]
    cast = FlatLayout.from_tensors(tensors[::2], dtype=torch.float32)  # elements of the flat dtype
    assert template(cast, "elements")[[0, 2]].tolist() == [[0, 4], [3, 2]]
    assert template(layout, "bytes") is rows  # built once per layout
    with pytest.raises(ValueError, match="unit must be one of"):
        template(layout, "words")


def test_same_storages_reuse_the_table_and_new_ones_rebuild_it() -> None:
    tensors = _tensors()
    layout, cache = FlatLayout.from_tensors(tensors), TableCache()
    first = _tables(cache, layout, tensors)
    assert _tables(cache, layout, list(tensors)) is first and cache.builds == 1
    assert first.view(4, -1)[1].tolist() == [t.data_ptr() for t in tensors]
    moved = list(tensors)
    moved[2] = tensors[2].clone()  # same shape and dtype, new storage
    second = _tables(cache, layout, moved)
    assert second is not first and cache.builds == 2
    assert second.view(4, -1)[1, 2].item() == moved[2].data_ptr()
    assert _tables(cache, layout, tensors) is first  # both kept (capacity 4)
    assert _tables(cache, layout, tensors, place=(0, 12345)) is not first  # another stream
    assert _tables(cache, layout, tensors, unit="elements") is not first


def test_the_cache_keeps_the_newest_tables() -> None:
    layout, cache = FlatLayout.from_tensors(_tensors()), TableCache(capacity=2)
    sets = [_tensors(seed) for seed in range(3)]
    tables = [_tables(cache, layout, ts) for ts in sets]
    assert len(cache) == 2 and cache.builds == 3
    assert _tables(cache, layout, sets[2]) is tables[2] and cache.builds == 3
    assert _tables(cache, layout, sets[0]) is not tables[0] and cache.builds == 4  # evicted, rebuilt
    with pytest.raises(ValueError, match="capacity"):
        TableCache(capacity=0)


def test_plans_name_the_kernel_and_point_at_the_table() -> None:
    tensors = _tensors()
    layout = FlatLayout.from_tensors(tensors)
    flat, cache = FlatBuffer(layout).flat, TableCache()
    launch = plan_pack(tensors, flat, layout, None, cache, PLACE, torch.from_numpy)
    table = launch.keep_alive
    assert launch.kernel == "pack_bytes" and launch.units == layout.nbytes
    assert launch.args == (table.data_ptr(), len(tensors), layout.nbytes, flat.data_ptr())
    scaled = plan_pack(tensors, flat, layout, 0.5, cache, PLACE, torch.from_numpy)
    assert scaled.kernel == "pack_cast" and scaled.units == layout.total and scaled.args[5:7] == (1, 0.5)
    assert plan_unpack(tensors, flat, layout, cache, PLACE, torch.from_numpy).args[0] == table.data_ptr()
    assert cache.builds == 2  # one bytes table for both directions, one elements table
    empty = FlatLayout.from_tensors([torch.empty(0)])
    assert plan_pack([torch.empty(0)], FlatBuffer(empty).flat, empty, None, cache, PLACE, torch.from_numpy) is None


def test_dense_copies_only_strided_tensors() -> None:
    base = torch.randn(4, 6)
    tensors = [base, base.t(), base[:, 1]]
    out = dense(tensors)
    assert out[0] is base and out[1].is_contiguous() and out[2].is_contiguous()
    assert torch.equal(out[1], base.t()) and torch.equal(out[2], base[:, 1])
    assert dense(tensors[:1]) == [base]


def test_equal_layouts_share_one_cache() -> None:
    tensors = _tensors()
    assert shared_cache(FlatLayout.from_tensors(tensors)) is shared_cache(FlatLayout.from_tensors(tensors))
    assert shared_cache(FlatLayout.from_tensors(tensors[:2])) is not shared_cache(FlatLayout.from_tensors(tensors))


def test_a_flat_buffer_checks_shapes_and_dtypes_on_every_call() -> None:
    # the table is keyed on addresses only: shapes and dtypes are checked before it is asked for
    tensors = _tensors()
    buffer = FlatBuffer.from_tensors(tensors)
    buffer.pack_from(tensors)
    with pytest.raises(ValueError, match=r"tensors\[4\] is torch.float32\[3, 2\] but the layout expects"):
        buffer.pack_from(tensors[:4] + [tensors[4].view(3, 2)])  # same storage, same bytes, other shape
    with pytest.raises(ValueError, match=r"out\[0\] is torch.float64\[3\]"):
        buffer.unpack_to([tensors[0].double()] + tensors[1:])
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        buffer.pack_from(tensors[:4] + [tensors[4].to("meta")])


def test_the_tile_sizes_match_the_kernel_source() -> None:
    from pipegrid.kernels.cuda_source import CUDA_SOURCE
    from pipegrid.kernels.segment_table import UNROLL

    assert f"#define UNROLL {UNROLL}\n" in CUDA_SOURCE  # grids are sized in tiles of BLOCK x UNROLL units
