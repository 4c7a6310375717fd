"""Memory per device: parameters, gradients, optimizer state after ZeRO-1/2 (or on the host), master weights,
and activations in flight for the schedule.

The first five keys (and ``total``, their sum) are those of ``engine.memory_report()``;
``activations`` comes on top of them (the engine reports what it holds between steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipegrid.plan.model import DTYPE_BYTES, LayerCost

__all__ = ["OptimizerSpec", "REPORT_KEYS", "memory_report", "activation_bytes", "in_step_bytes"]

REPORT_KEYS = ("parameters", "gradients", "optimizer", "master_weights", "buffers", "total")
_STATE_SLOTS = {"adam": 2, "adamw": 2, "sgd": 0, "sgd_momentum": 1}


@dataclass(frozen=True)
class OptimizerSpec:
    """What the optimizer keeps per parameter."""

    name: str = "adam"
    """adam / adamw (2 fp32 slots), sgd_momentum (1), sgd (0)."""
    dtype: str = "float32"
    """Model dtype; below float32 the engine keeps fp32 master weights."""

    def __post_init__(self) -> None:
        if self.name not in _STATE_SLOTS:
            raise ValueError(f"optimizer must be one of {', '.join(_STATE_SLOTS)}, got {self.name!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def master_bytes(self) -> int:
        """fp32 master copy per parameter when the model runs in 16-bit, else none."""
        return 4 if DTYPE_BYTES[self.dtype] < 4 else 0

    @property
    def state_bytes(self) -> int:
        """Optimizer slots per parameter, in the master (or model) precision."""
        return _STATE_SLOTS[self.name] * max(4, DTYPE_BYTES[self.dtype])


_BUCKETS_ALIVE = 3  # pipe/zero/buckets.py: max_in_flight=2 reductions behind the one filling


def memory_report(parameters: int, optimizer: OptimizerSpec, *, data: int = 1, zero: bool | int = False,
                  buffers: int = 0, offload: bool = False, bucket_elements: int | None = None) -> dict[str, int]:
    """Bytes on one rank holding ``parameters`` (its stages, its tensor shard), as
    ``engine.memory_report()`` counts them: the storages allocated during a step.

    ZeRO-1 (``zero=True`` or 1) puts parameters and gradients in flat buffers padded to a
    multiple of ``data`` and splits optimizer state and master weights over the ``data``
    ranks; gradients stay whole. ZeRO-2 (``zero=2``) holds only the gradient shard at the
    optimizer step; ``step_gradients`` (not in ``total``) is the full-size buffer its
    backwards fill, alive beside the activations; with ``bucket_elements``
    (``zero.reduce_every_micro_batch``, pipe/zero/buckets.py) it is the shard and the buckets
    alive at once instead (about 3: one filling, two reducing; a parameter
    spanning several buckets, or one without a gradient, keeps more). ZeRO-3 (``zero=3``) holds no parameters
    between steps, only the fp32 master shard; ``step_parameters`` (not in ``total``) is the
    whole parameters a step gathers. ``offload`` moves optimizer state and
    master weights (and a gradient shard) to ``*_host`` keys, outside the device ``total``.
    (The engine also pads each tensor to 16 bytes, which this ignores.)
    """
    if data < 1:
        raise ValueError(f"data must be >= 1, got {data}")
    stage = int(zero)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3 (or a bool for 0/1), got {zero!r}")
    width = DTYPE_BYTES[optimizer.dtype]
    grad_width = max(width, 4)  # 16-bit training accumulates its gradients in fp32
    sharded = -(-parameters // data) if stage else parameters
    held = sharded * data if stage else parameters  # the flat buffers' padding
    # the engine's own buffer (pipegrid/pipe/zero/): ZeRO-1's reduce-scatter output (ZeRO-2 writes the shard)
    engine_buffers = sharded * grad_width if stage == 1 and data > 1 else 0
    # offload and ZeRO-3: the master shard is always a copy of its own
    master = sharded * (optimizer.master_bytes or (max(width, 4) if offload or stage == 3 else 0))
    report = {
        "parameters": 0 if stage == 3 else held * width,
        "gradients": (sharded if stage >= 2 else held) * grad_width,
        "optimizer": 0 if offload else sharded * optimizer.state_bytes,
        "master_weights": 0 if offload else master,
        "buffers": engine_buffers + int(buffers),
    }
    report["total"] = sum(report.values())
    if stage >= 2 and bucket_elements:
        bucket = min(bucket_elements, sharded)  # a bucket lies within one shard
        report["step_gradients"] = (sharded + min(held, _BUCKETS_ALIVE * bucket)) * grad_width
    elif stage >= 2:
        report["step_gradients"] = held * grad_width
    if stage == 3:
        report["step_parameters"] = held * width
    if offload:
        report.update(optimizer_host=sharded * optimizer.state_bytes, master_weights_host=master,
                      gradients_host=master)
    return report


def in_step_bytes(report: dict[str, int]) -> int:
    """Bytes a step holds beside the activations on top of ``report["total"]``: ZeRO-2's
    full-size gradient buffer (beyond the shard) and ZeRO-3's gathered parameters."""
    extra_gradients = report.get("step_gradients", report["gradients"]) - report["gradients"]
    return extra_gradients + report.get("step_parameters", 0)


def activation_bytes(chunks: Sequence[Sequence[LayerCost]], inflight: Sequence[int],
                     recompute: bool) -> int:
    """Activations one rank holds at its peak: each chunk's stored bytes per micro-batch
    times the micro-batches in flight there; with recomputation, also the working set of
    the largest layer while it is recomputed."""
    held = 0.0
    for layers, count in zip(chunks, inflight):
        per_micro_batch = sum(l.checkpoint_bytes if recompute else l.activation_bytes for l in layers)
        held += count * per_micro_batch
    if recompute:
        held += max((l.activation_bytes for layers in chunks for l in layers), default=0.0)
    return int(held)
