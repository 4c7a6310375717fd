"""``zero.reduce_every_micro_batch``'s gradient buckets (DeepSpeed ZeRO-2's ``reduce_bucket_size``,
``overlap_comm``, ``contiguous_gradients``): no full-size gradient buffer, only a few buckets.

The flat layout (ZeRO-1's) is cut into buckets of at most ``zero.bucket_elements`` elements, each
inside one data rank's shard, numbered from the layout's end, as backward produces gradients:

    layout   | p0 | p1 |  p2  |      p3      | pad |        shard r = [r*S, (r+1)*S)
    shards   |<------ rank 0 ------>|<------ rank 1 ------>|
    buckets  |  b4  |  b3   |  b2   |  b1   |     b0       |   (p3 spans b0, b1 and the shard edge)

A parameter's post-accumulate-grad hook adds its gradient (16-bit ones in fp32) into its bucket(s)
and frees ``.grad``. A bucket all of whose parameters are in is reduced, asynchronously, to the
rank owning its range (``dist.reduce``: a bucket lies in one shard, so a reduce-scatter would move
data - 1 empty pieces), which adds the sum into its fp32 gradient shard; the bucket is freed when
the reduction completes, at the latest when ``max_in_flight`` others are behind it or at ``flush``.
``flush`` (after each micro-batch's weight gradients, and at the step's end) reduces every bucket
something went into that is not complete (parameters without a gradient), in bucket order.

Collectives match by their order on every data rank: the buckets are issued in the order their
gradients complete, which is the same on every data rank as long as they run the same autograd
graph (the same model, schedule and used parameters: autograd's order is deterministic for one
graph), as DeepSpeed and DDP also assume. ``check_order`` verifies it once a step (one small
all-reduce of a fingerprint of the issued sequence) and names the fix when it does not hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels

_FINGERPRINT_MOD = (1 << 61) - 1  # a Mersenne prime: the issued sequence's hash stays an exact int64


@dataclass
class _Bucket:
    """A range [lo, hi) of the flat layout inside ``owner``'s shard, and the parameters with a piece in it."""

    index: int
    owner: int
    lo: int
    hi: int
    params: set[int] = field(default_factory=set)
    buffer: torch.Tensor | None = None
    """The gradients added so far this round (None until the first one arrives)."""
    arrived: set[int] = field(default_factory=set)


@dataclass
class _InFlight:
    bucket: _Bucket
    buffer: torch.Tensor
    work: Any


def plan_buckets(layout: kernels.FlatLayout, indices: list[int], shard_size: int,
                 max_elements: int) -> tuple[list[_Bucket], dict[int, list[tuple[int, int, int]]]]:
    """Buckets over the parameters ``indices`` of ``layout`` (walked from the end), and each
    parameter's pieces (bucket number, lo, hi). A bucket is one contiguous range of the layout
    (padding between its parameters included) that lies in one shard, holds at most
    ``max_elements`` elements, and never spans a parameter left out of ``indices``."""
    if max_elements < 1:
        raise ValueError(f"zero.bucket_elements must be at least 1, got {max_elements}")
    buckets: list[_Bucket] = []
    pieces: dict[int, list[tuple[int, int, int]]] = {i: [] for i in indices}
    current: _Bucket | None = None
    previous = None
    for i in sorted(indices, reverse=True):
        start, end = layout.offsets[i], layout.offsets[i] + layout.numels[i]
        adjacent = previous == i + 1  # nothing left out between this parameter and the bucket
        previous = i
        while end > start:
            owner = (end - 1) // shard_size
            floor = max(start, owner * shard_size)
            if current is None or current.owner != owner or not adjacent or current.hi - current.lo >= max_elements:
                current = _Bucket(len(buckets), owner, end, end)
                buckets.append(current)
            low = max(floor, current.hi - max_elements)
            current.lo = low
            current.params.add(i)
            pieces[i].append((current.index, low, end))
            end, adjacent = low, True
    return buckets, pieces


class GradientBuckets:
    """Buckets for ``indices`` of the layout; ``deliver(lo, summed)`` adds an owned bucket's sum
    (over data) at layout offset ``lo`` into this rank's gradient shard."""

    def __init__(self, layout: kernels.FlatLayout, indices: list[int], shard_size: int, group: Any,
                 data_size: int, data_rank: int, dtype: torch.dtype, device: torch.device, max_elements: int,
                 deliver: Callable[[int, torch.Tensor], None], max_in_flight: int = 2) -> None:
        self.layout, self.group, self.data_size, self.data_rank = layout, group, data_size, data_rank
        self.dtype, self.device, self.deliver, self.max_in_flight = dtype, device, deliver, max_in_flight
        self.buckets, self.pieces = plan_buckets(layout, indices, shard_size, max_elements)
        self._in_flight: list[_InFlight] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        """The most bucket bytes alive at once since ``reset_peak``."""
        self._fingerprint = 0

    def add(self, i: int, grad: torch.Tensor) -> None:
        """Parameter ``i``'s gradient (any float dtype) into its bucket(s); full ones are reduced."""
        flat = grad.detach().reshape(-1)
        offset = self.layout.offsets[i]
        for number, lo, hi in self.pieces[i]:
            bucket = self.buckets[number]
            if bucket.buffer is None:
                bucket.buffer = torch.zeros(bucket.hi - bucket.lo, dtype=self.dtype, device=self.device)
                self._count(bucket.buffer.untyped_storage().nbytes())
            bucket.buffer[lo - bucket.lo:hi - bucket.lo].add_(flat[lo - offset:hi - offset])
            bucket.arrived.add(i)
            if len(bucket.arrived) == len(bucket.params):
                self._issue(bucket)
                self._retire(self.max_in_flight, completed_too=True)

    def flush(self) -> None:
        """Reduce every bucket something went into, in bucket order, and wait for all reductions."""
        for bucket in self.buckets:
            if bucket.buffer is not None:
                self._issue(bucket)
        self._retire(0)

    def _issue(self, bucket: _Bucket) -> None:
        buffer, bucket.buffer = bucket.buffer, None
        bucket.arrived = set()
        self._fingerprint = (self._fingerprint * 1_000_003 + bucket.index + 1) % _FINGERPRINT_MOD
        work = None
        if self.data_size > 1:
            work = dist.reduce(buffer, dst=None, group=self.group, group_dst=bucket.owner, async_op=True)
        self._in_flight.append(_InFlight(bucket, buffer, work))

    def _retire(self, keep: int, completed_too: bool = False) -> None:
        """Finish the oldest reductions until ``keep`` are left (and any already complete after them):
        the owner adds the sum into its shard, every rank frees the bucket."""
        while self._in_flight:
            oldest = self._in_flight[0]
            done = oldest.work is None or (completed_too and oldest.work.is_completed())
            if len(self._in_flight) <= keep and not done:
                return
            self._in_flight.pop(0)
            if oldest.work is not None:
                oldest.work.wait()
            if oldest.bucket.owner == self.data_rank:
                self.deliver(oldest.bucket.lo, oldest.buffer)
            self.live_bytes -= oldest.buffer.untyped_storage().nbytes()

    def _count(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def discard(self) -> None:
        """Drop what the buckets hold (a skipped step); reductions in flight finish first."""
        for item in self._in_flight:
            if item.work is not None:
                item.work.wait()
        self._in_flight.clear()
        for bucket in self.buckets:
            bucket.buffer, bucket.arrived = None, set()
        self.live_bytes = 0

    def check_order(self, where: str) -> None:
        """Collective over data: every rank issued the same buckets in the same order since the last call."""
        fingerprint, self._fingerprint = self._fingerprint, 0
        if self.data_size == 1:
            return
        both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(f"{where}: the data ranks reduced their gradient buckets in different orders this "
                               "step (their backwards ran different autograd graphs, e.g. a parameter used on "
                               "some data ranks only), so the sums mixed buckets; make every data rank use the "
                               "same parameters, or set zero.reduce_every_micro_batch=false")
