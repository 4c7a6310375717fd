"""Sequence parallelism (Megatron-LM's ``sequence_parallel``, Korthikanti et al. 2022): between
the tensor-parallel regions, activations ``(B, T, H)`` are split along the sequence (dim 1).

The norms, residual adds and dropout then run on T/t tokens of each rank, their activations
are 1/t, and so are the pipeline messages between stages. A column-parallel layer all-gathers
its input along the sequence (backward: reduce-scatter) and a row-parallel layer reduce-scatters
its output (backward: all-gather), the same bytes as the all-reduce they replace:

    shard (B, T/t, H) --all_gather_sequence--> [column ... row] --reduce_scatter_sequence--> shard

A column layer's weight gradient needs its whole input; as in Megatron, only this rank's chunk is
kept for backward and gathered again when the gradient is computed (:func:`saving_chunk`), so the
linear layers' saved inputs are 1/t too.

Parameters outside the regions (norm weights, row biases) see only their rank's tokens, so
their gradients are partial sums: they are marked ``sequence_parallel = True`` and the engine
all-reduces them over the tensor group once per step, before clipping (``mark_sequence_parallel``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.tensor.mappings import Group, _apply_in, conjugate

__all__ = [
    "Regather",
    "SequenceParallel",
    "all_gather_sequence",
    "gather_from_sequence_region",
    "is_sequence_parallel",
    "mark_sequence_parallel",
    "reduce_scatter_sequence",
    "saving_chunk",
    "scatter_to_sequence_region",
]

SEQUENCE_DIM = 1  # activations are batch-first (B, T, H)


class SequenceParallel:
    """Whether one model's sequence-parallel layers split the sequence now: truthy while on.

    One object per model, shared by all its layers, so a path that cannot split (generation,
    whose decode steps have T = 1) turns the whole model off at once with :meth:`off` instead
    of each layer guessing from shapes. Layers also take a plain bool (always on or off).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __bool__(self) -> bool:
        return self.enabled

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Run the model on whole sequences within the block (every rank the same tokens)."""
        saved, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = saved

    def __repr__(self) -> str:
        return f"SequenceParallel(enabled={self.enabled})"


def mark_sequence_parallel(module_or_params: nn.Module | list[torch.Tensor]) -> None:
    """Mark replicated parameters that see sequence-split activations (Megatron's attribute):
    the engine sums their gradients over the tensor group once per step."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    for param in params:
        if not getattr(param, "tensor_model_parallel", False):
            param.sequence_parallel = True


def is_sequence_parallel(param: torch.Tensor) -> bool:
    """True for a replicated parameter whose gradient is partial per tensor rank (see the module doc)."""
    return bool(getattr(param, "sequence_parallel", False))


def _all_gather(out: torch.Tensor, x: torch.Tensor, group: Group) -> None:
    # torch 2.13 names it all_gather_single; earlier releases (2.11 on the GPU box) all_gather_into_tensor.
    # Looked up per call, so a wrapped torch.distributed (benchmarks/hf_tp_speed.py counts) sees it
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, group: Group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


def _chunk_length(x: torch.Tensor, parts: int) -> int:
    length = x.shape[SEQUENCE_DIM]
    if length % parts:
        raise ValueError(f"sequence parallelism splits the sequence over the tensor group of {parts} ranks, but "
                         f"this micro-batch has sequence length {length} (shape {tuple(x.shape)}); pad the "
                         f"sequences to a multiple of {parts} (e.g. seq_len {-(-length // parts) * parts}) or "
                         "turn sequence_parallel off")
    return length // parts


def _own_chunk(x: torch.Tensor, group: Group) -> torch.Tensor:
    width = _chunk_length(x, dist.get_world_size(group))
    return x.narrow(SEQUENCE_DIM, dist.get_rank(group) * width, width).contiguous()


def _gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, T/t, ...) on every rank -> (B, T, ...), rank order along the sequence: one copy, after the
    collective (which stacks whole chunks on a leading dim)."""
    parts = dist.get_world_size(group)
    stacked = x.new_empty((parts * x.shape[0], *x.shape[1:]))  # (t B, T/t, ...): the collective's layout
    _all_gather(stacked, x.contiguous(), group)
    stacked = stacked.unflatten(0, (parts, x.shape[0]))  # (t, B, T/t, ...)
    return stacked.transpose(0, SEQUENCE_DIM).flatten(SEQUENCE_DIM, SEQUENCE_DIM + 1)  # (B, T, ...)


def _scatter_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, T, ...) partial sums on every rank -> this rank's (B, T/t, ...) of their sum: one copy, before
    the collective (which scatters whole chunks of a leading dim)."""
    parts = dist.get_world_size(group)
    width = _chunk_length(x, parts)
    chunks = x.unflatten(SEQUENCE_DIM, (parts, width)).transpose(0, SEQUENCE_DIM).contiguous()  # (t, B, T/t, ...)
    out = x.new_empty(chunks.shape[1:])
    _reduce_scatter(out, chunks.flatten(0, 1), group)  # (t B, T/t, ...): the collective's layout
    return out


_ScatterToSequence = conjugate("_ScatterToSequence", "Keep this rank's chunk of the sequence forward; all-gather "
                               "backward.", _own_chunk, _gather)
_GatherFromSequence = conjugate("_GatherFromSequence", "All-gather the sequence forward; keep this rank's chunk "
                                "backward (the conjugate of scatter).", _gather, _own_chunk)
_AllGatherSequence = conjugate("_AllGatherSequence", "All-gather the sequence forward; reduce-scatter backward (the "
                               "region's gradients are partial).", _gather, _scatter_sum)
_ReduceScatterSequence = conjugate("_ReduceScatterSequence", "Reduce-scatter along the sequence forward; all-gather "
                                   "backward.", _scatter_sum, _gather)


class Regather:
    """What backward keeps of a gathered input: this rank's chunk, gathered again on first use and
    shared by the sibling layers that read it (q, k, v), so they pay one gather between them. The
    whole tensor lives from the first unpack until the last node holding this object has run."""

    def __init__(self, chunk: torch.Tensor, group: Group) -> None:
        self.chunk, self.group = chunk.detach(), group
        self._whole: torch.Tensor | None = None

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            with torch.no_grad():
                self._whole = _gather(self.chunk, self.group)
        return self._whole


class _SavedView:
    """A saved view (shape, strides, offset) of a gathered tensor, rebuilt from its :class:`Regather`."""

    def __init__(self, regather: Regather, t: torch.Tensor) -> None:
        self.regather, self.shape, self.stride, self.offset = regather, t.shape, t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.regather.whole().as_strided(self.shape, self.stride, self.offset)


@contextlib.contextmanager
def saving_chunk(gathered: torch.Tensor, regather: Regather | None) -> Iterator[None]:
    """Within the block, autograd saves ``regather``'s chunk instead of any view of ``gathered`` (and
    gathers again in backward). A no-op without autograd, without a chunk, or while compiling (the
    compiled graph keeps what it keeps)."""
    if regather is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    storage = gathered.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> Any:
        return _SavedView(regather, t) if t.untyped_storage().data_ptr() == storage else t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


def _unpack(saved: Any) -> torch.Tensor:
    return saved.tensor() if isinstance(saved, _SavedView) else saved


# a second unpack (a split backward's W after its I) finds the whole tensor gathered by the first:
# pipegrid.pipe.split_backward may defer weight gradients below nodes saved through this hook
_unpack.unpacks_again_cheaply = True  # type: ignore[attr-defined]


def scatter_to_sequence_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Whole sequence (the same on every rank) -> this rank's chunk; backward all-gathers.
    Refuses a sequence length the group does not divide, naming the fix."""
    return _apply_in(_ScatterToSequence, x, group)


def gather_from_sequence_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Chunks -> the whole sequence, where each rank's gradient is already whole (backward keeps the chunk)."""
    return _apply_in(_GatherFromSequence, x, group)


def all_gather_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Enter a tensor-parallel region from sequence chunks: all-gather forward, reduce-scatter of the
    (partial) gradient backward. Replaces ``copy_to_region`` before column-parallel layers."""
    return _apply_in(_AllGatherSequence, x, group)


def reduce_scatter_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Leave a region into sequence chunks by summing partial results: reduce-scatter forward,
    all-gather backward. Replaces ``reduce_from_region`` after row-parallel layers."""
    return _apply_in(_ReduceScatterSequence, x, group)
