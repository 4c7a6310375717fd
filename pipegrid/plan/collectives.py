"""Seconds of the collectives the planner charges: ring all-reduce and all-gather, and a layer's
tensor-parallel traffic with and without sequence parallelism (the extra backward re-gathers)."""

from __future__ import annotations

from pipegrid.plan.hardware import DeviceSpec, Link
from pipegrid.plan.model import LayerCost

__all__ = ["ring_allreduce_s", "ring_allgather_s", "tensor_comm_s", "sequence_regather_s"]


def ring_allreduce_s(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: 2 (n-1)/n bytes / bandwidth + 2 (n-1) latencies (0 for one rank)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.latency


def ring_allgather_s(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-gather of an ``nbytes`` result (a ring reduce-scatter of ``nbytes`` costs the same):
    (n-1)/n bytes / bandwidth + (n-1) latencies, half a ring all-reduce."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return (ranks - 1) / ranks * nbytes / link.bandwidth + (ranks - 1) * link.latency


def tensor_comm_s(layer: LayerCost, tensor: int, link: Link, device: DeviceSpec) -> float:
    """Seconds of one layer's tensor-parallel collectives in forward, and the same again in backward.

    Without sequence parallelism: ``tensor_allreduces`` ring all-reduces. With it
    (``layer.sequence_regathers`` > 0) each all-reduce becomes an all-gather + reduce-scatter of the
    same tensor (forward: gather into the column layer, scatter out of the row layer; backward the
    reverse), on a ring the same bytes as the all-reduce (Korthikanti et al. 2022, arXiv 2205.05198,
    section 4.2.2), except where ``device.reduce_scatter_allreduces`` (gloo: a reduce-scatter costs a
    whole all-reduce, so each pair costs 1.5 all-reduces). The backward's re-gathers are
    ``sequence_regather_s``.
    """
    allreduce = ring_allreduce_s(layer.tensor_allreduce_bytes, tensor, link)
    if not layer.sequence_regathers:
        return layer.tensor_allreduces * allreduce
    gather = ring_allgather_s(layer.tensor_allreduce_bytes, tensor, link)
    return layer.tensor_allreduces * (gather + (allreduce if device.reduce_scatter_allreduces else gather))


def sequence_regather_s(layer: LayerCost, tensor: int, link: Link, device: DeviceSpec, gemm_s: float) -> float:
    """Seconds sequence parallelism's backward re-gathers (``layer.sequence_regathers`` all-gathers of
    the kept input chunks, one per column-parallel group) add to a layer's backward: all of them where
    the device does not overlap communication (CPU gloo: the transfers take the cores), else only what
    exceeds ``gemm_s``, the input-gradient GEMMs they run under. Megatron posts the gather, computes
    dX, then waits before dW; pipegrid's ``Regather`` gathers on the weight gradient's first use, so
    on GPUs this assumes the gather is posted that early (Megatron's order), not what pipegrid does now.
    """
    regather = layer.sequence_regathers * ring_allgather_s(layer.tensor_allreduce_bytes, tensor, link)
    return regather if not device.overlaps_comm else max(0.0, regather - gemm_s)
