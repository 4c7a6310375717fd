"""Tensor-parallel layers (Megatron-LM style): linear layers split by output or input
features and a vocab-split embedding, each taking ``group`` (see :mod:`.mappings`).

A sharded layer starts as this rank's slice of the dense layer's initialisation
under the current RNG, so tensor=2 and tensor=1 start identical. The full dense
layer is built transiently on every rank for that (as Megatron's CPU init does).

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim``
(Megatron's names); :func:`is_tensor_sharded` is how the rest of pipegrid asks.

``sequence_parallel`` (a bool, or a model's :class:`~pipegrid.tensor.sequence.SequenceParallel`
switch): inputs and outputs outside the region are split along the sequence (dim 1) instead of
replicated; see :mod:`.sequence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipegrid.tensor.mappings import (Group, _active, _shard_size, copy_to_region, gather_from_region,
                                      reduce_from_region, split_to_region, tensor_parallel_rank,
                                      tensor_parallel_size)
from pipegrid.tensor.sequence import (Regather, SequenceParallel, all_gather_sequence, reduce_scatter_sequence,
                                      saving_chunk)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SharedInputCopy",
    "VocabParallelEmbedding",
    "is_tensor_sharded",
]


def _shard_parameter(full: torch.Tensor, dim: int, rank: int, parts: int) -> nn.Parameter:
    size = full.shape[dim] // parts
    param = nn.Parameter(full.detach().narrow(dim, rank * size, size).clone())
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    return param


def is_tensor_sharded(param: torch.Tensor) -> bool:
    """True for a parameter split across the tensor-parallel group (each rank holds a slice).

    A gradient norm counts such a parameter on every tensor rank and every other
    (replicated) one on a single rank. Recognises this package's layers and any
    layer marked with Megatron's ``tensor_model_parallel = True``.
    """
    return bool(getattr(param, "tensor_model_parallel", False))


def _check_dense(dense: nn.Module, expected: type, shape: tuple[int, int], has_bias: bool) -> None:
    if not isinstance(dense, expected):
        raise TypeError(f"init_from must be an {expected.__name__}, got {type(dense).__name__}")
    if tuple(dense.weight.shape) != shape or (getattr(dense, "bias", None) is not None) != has_bias:
        raise ValueError(f"init_from has weight {tuple(dense.weight.shape)} (bias: "
                         f"{getattr(dense, 'bias', None) is not None}) but this layer needs weight "
                         f"{shape} (bias: {has_bias}); pass a dense layer of the same sizes")


class SharedInputCopy:
    """One entry into the region for sibling column-parallel layers that read the same input
    within one call of their parent (q, k and v of an attention; gate and up of an MLP).

    Each column layer's entry all-reduces its input's gradient in backward (under sequence
    parallelism: all-gathers the input and reduce-scatters the gradient); siblings sharing one
    entry let autograd sum their gradients first, so the parent pays one collective instead of
    one per projection (Megatron gets this by fusing q, k and v into one layer). The shared entry
    lives only during the parent's forward (its hooks clear it), so no activation outlives the
    call, and an input seen again (recomputation) gets a fresh one.
    """

    def __init__(self, group: Group, sequence_parallel: bool | SequenceParallel = False) -> None:
        self.group = group
        self.sequence_parallel = sequence_parallel
        self._held: tuple[torch.Tensor, torch.Tensor, Regather | None] | None = None
        """(input, its entry, what backward keeps of a gathered entry) in this call"""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.enter(x)[0]

    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, Regather | None]:
        """The entry of ``x`` (shared), and under sequence parallelism what backward keeps of it."""
        if self._held is not None and (self._held[0] is x or self._held[1] is x):
            return self._held[1], self._held[2]
        if self.sequence_parallel:
            entered, regather = all_gather_sequence(x, self.group), _regather(x, self.group)
        else:
            entered, regather = copy_to_region(x, self.group), None
        self._held = (x, entered, regather)
        return entered, regather

    def attach(self, parent: nn.Module, enter_at_parent: bool = False) -> None:
        """Scope the sharing to each call of ``parent``. ``enter_at_parent``: under sequence
        parallelism, gather the parent's first input as it is called, so a parent that reads
        shapes off its input (transformers' attention: ``hidden.shape[:-1]``) sees the whole sequence."""
        parent.register_forward_pre_hook(self._enter_parent if enter_at_parent else self._open, with_kwargs=True)
        parent.register_forward_hook(self._close)

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._held = None

    def _enter_parent(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._held = None
        if not self.sequence_parallel:
            return None
        if args:
            return (self(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}
        raise TypeError(f"sequence parallelism gathers the input of {type(module).__name__}, but it was called "
                        f"with neither a positional input nor hidden_states= (got {sorted(kwargs)}); set "
                        "sequence_parallel=False for this model")

    def _close(self, module: nn.Module, args: tuple, output: object) -> None:
        self._held = None


def _regather(chunk: torch.Tensor, group: Group) -> Regather | None:
    active = _active(group)
    return None if active is None else Regather(chunk, active)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A's rows (output features) split across the group.

    The input is replicated on every rank (``sequence_parallel``: split along the sequence, and
    all-gathered here); each rank computes its slice of the
    output features (``gather_output=True`` concatenates them). ``init_from``: the
    dense ``nn.Linear`` to take this rank's shard of (default: a fresh one, drawn from
    the current RNG).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group: Group = None, *,
                 init_from: nn.Linear | None = None, sequence_parallel: bool | SequenceParallel = False) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        parts, rank = tensor_parallel_size(group), tensor_parallel_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_features_per_rank = _shard_size(out_features, parts, "out_features")
        self.gather_output = gather_output
        dense = nn.Linear(in_features, out_features, bias=bias) if init_from is None else init_from
        _check_dense(dense, nn.Linear, (out_features, in_features), bias)
        self.weight = _shard_parameter(dense.weight, 0, rank, parts)  # (out / parts, in)
        self.bias = _shard_parameter(dense.bias, 0, rank, parts) if bias else None
        self.input_copy: SharedInputCopy | None = None
        """Set when siblings read the same input: one backward all-reduce (or gather) for all of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regather = None
        if self.input_copy is not None:
            x, regather = self.input_copy.enter(x)
        elif self.sequence_parallel:
            x, regather = all_gather_sequence(x, self.group), _regather(x, self.group)  # (B, T/parts, in) -> (B, T, in)
        else:
            x = copy_to_region(x, self.group)
        with saving_chunk(x, regather):  # backward keeps the chunk, gathers it again for the weight gradient
            y = F.linear(x, self.weight, self.bias)  # (..., out / parts)
        return gather_from_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_features_per_rank} per rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={bool(self.sequence_parallel)}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A's columns (input features) split across the group.

    Each rank multiplies its slice of the input features (already split when
    ``input_is_parallel``, e.g. a ColumnParallelLinear's output) and the partial
    outputs are all-reduced; the bias is replicated and added once, after the sum.
    ``sequence_parallel``: the partial outputs are reduce-scattered along the sequence instead,
    and the bias (marked ``sequence_parallel``) is added to this rank's chunk.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group: Group = None, *,
                 init_from: nn.Linear | None = None, sequence_parallel: bool | SequenceParallel = False) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        parts, rank = tensor_parallel_size(group), tensor_parallel_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = _shard_size(in_features, parts, "in_features")
        self.input_is_parallel = input_is_parallel
        dense = nn.Linear(in_features, out_features, bias=bias) if init_from is None else init_from
        _check_dense(dense, nn.Linear, (out_features, in_features), bias)
        self.weight = _shard_parameter(dense.weight, 1, rank, parts)  # (out, in / parts)
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_to_region(x, self.group)  # (..., in / parts)
        y = F.linear(x, self.weight)  # (B, T, out), partial sums
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.group)  # (B, T / parts, out)
        else:
            y = reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={bool(self.sequence_parallel)}")


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across the group.

    Rank r holds ids ``[r * V/p, (r + 1) * V/p)``; ids outside its slice look up
    zeros and the all-reduce of the outputs fills them in. A tied output head that
    uses ``weight`` gets the same vocab slice, so the tie holds per tensor rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group = None, *,
                 init_from: nn.Embedding | None = None) -> None:
        super().__init__()
        self.group = group
        parts, rank = tensor_parallel_size(group), tensor_parallel_rank(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_rank = _shard_size(num_embeddings, parts, "num_embeddings (vocab)")
        self.vocab_start = rank * self.num_embeddings_per_rank
        dense = nn.Embedding(num_embeddings, embedding_dim) if init_from is None else init_from
        _check_dense(dense, nn.Embedding, (num_embeddings, embedding_dim), False)
        self.weight = _shard_parameter(dense.weight, 0, rank, parts)  # (V / parts, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _active(self.group) is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., C)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ({self.num_embeddings_per_rank} per rank, from "
                f"{self.vocab_start}), {self.embedding_dim}")
