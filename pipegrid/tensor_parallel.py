"""Tensor-parallel layers (Megatron-LM style): linear layers split by output or input
features, a vocab-split embedding, and a cross-entropy that never gathers the full logits.

Every layer takes ``group``, a torch.distributed process group: pass
``groups.tensor_parallel_group`` (or ``dist.group.WORLD`` to split over every process).
``None`` means no tensor parallelism, as :class:`~pipegrid.ProcessGroups` reports a
one-rank group; unlike torch's collectives, it never means the world (at pipe=2,
tensor=1 that would shard a layer over the pipeline stages). With ``None``, a one-rank
group or torch.distributed not initialised, every layer is dense and every collective
an identity.
A sharded layer starts as this rank's slice of the dense layer's initialisation
under the current RNG, so tensor=2 and tensor=1 start identical. The full dense
layer is built transiently on every rank for that (as Megatron's CPU init does).

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim``
(Megatron's names): a gradient-norm computation counts them on every tensor rank
and every other (replicated) parameter once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_region",
    "gather_from_region",
    "reduce_from_region",
    "split_to_region",
    "tensor_parallel_rank",
    "tensor_parallel_size",
    "vocab_parallel_cross_entropy",
]

Group = Any  # a torch.distributed ProcessGroup, or None for none (dense)


# ---- the group --------------------------------------------------------------------

def _active(group: Group) -> Group:
    """The group collectives run on, or None when there is nothing to run (dense)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return group if dist.get_world_size(group) > 1 else None


def tensor_parallel_size(group: Group = None) -> int:
    """Ranks in ``group``; 1 for None or when torch.distributed is not initialised."""
    active = _active(group)
    return 1 if active is None else dist.get_world_size(active)


def tensor_parallel_rank(group: Group = None) -> int:
    """This process's rank within ``group``; 0 when dense."""
    active = _active(group)
    return 0 if active is None else dist.get_rank(active)


def _loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits (exp/sum lose too much), float64 kept as is."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _shard_size(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(
            f"{what}={total} must be divisible by the tensor-parallel group size {parts}; "
            f"choose {what} a multiple of {parts} or a smaller tensor degree")
    return total // parts


# ---- conjugate autograd functions ---------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _all_gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    width = _shard_size(x.shape[-1], dist.get_world_size(group), "last dimension")
    start = dist.get_rank(group) * width
    return x[..., start:start + width].contiguous()


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _own_slice_last(grad, ctx.group), None


class _SplitToRegion(torch.autograd.Function):
    """Keep this rank's slice of the last dim forward; all-gather backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _own_slice_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced backward."""
    active = _active(group)
    return x if active is None else _CopyToRegion.apply(x, active)


def reduce_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Leave a region by summing partial results: all-reduce forward, identity backward."""
    active = _active(group)
    return x if active is None else _ReduceFromRegion.apply(x, active)


def gather_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Leave a region by concatenating shards along the last dim (backward keeps the slice)."""
    active = _active(group)
    return x if active is None else _GatherFromRegion.apply(x, active)


def split_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Enter a region by keeping this rank's slice of the last dim (backward gathers)."""
    active = _active(group)
    return x if active is None else _SplitToRegion.apply(x, active)


# ---- layers -------------------------------------------------------------------------

def _shard_parameter(full: torch.Tensor, dim: int, rank: int, parts: int) -> nn.Parameter:
    size = full.shape[dim] // parts
    param = nn.Parameter(full.detach().narrow(dim, rank * size, size).clone())
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    return param


def _check_dense(dense: nn.Module, expected: type, shape: tuple[int, int], has_bias: bool) -> None:
    if not isinstance(dense, expected):
        raise TypeError(f"init_from must be an {expected.__name__}, got {type(dense).__name__}")
    if tuple(dense.weight.shape) != shape or (getattr(dense, "bias", None) is not None) != has_bias:
        raise ValueError(f"init_from has weight {tuple(dense.weight.shape)} (bias: "
                         f"{getattr(dense, 'bias', None) is not None}) but this layer needs weight "
                         f"{shape} (bias: {has_bias}); pass a dense layer of the same sizes")


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A's rows (output features) split across the group.

    The input is replicated on every rank; each rank computes its slice of the
    output features (``gather_output=True`` concatenates them). ``init_from``: the
    dense ``nn.Linear`` to take this rank's shard of (default: a fresh one, drawn from
    the current RNG).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group: Group = None, *,
                 init_from: nn.Linear | None = None) -> None:
        super().__init__()
        self.group = group
        parts, rank = tensor_parallel_size(group), tensor_parallel_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_features_per_rank = _shard_size(out_features, parts, "out_features")
        self.gather_output = gather_output
        dense = nn.Linear(in_features, out_features, bias=bias) if init_from is None else init_from
        _check_dense(dense, nn.Linear, (out_features, in_features), bias)
        self.weight = _shard_parameter(dense.weight, 0, rank, parts)  # (out / parts, in)
        self.bias = _shard_parameter(dense.bias, 0, rank, parts) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.group), self.weight, self.bias)  # (..., out / parts)
        return gather_from_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_features_per_rank} per rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A's columns (input features) split across the group.

    Each rank multiplies its slice of the input features (already split when
    ``input_is_parallel``, e.g. a ColumnParallelLinear's output) and the partial
    outputs are all-reduced; the bias is replicated and added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group: Group = None, *,
                 init_from: nn.Linear | None = None) -> None:
        super().__init__()
        self.group = group
        parts, rank = tensor_parallel_size(group), tensor_parallel_rank(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = _shard_size(in_features, parts, "in_features")
        self.input_is_parallel = input_is_parallel
        dense = nn.Linear(in_features, out_features, bias=bias) if init_from is None else init_from
        _check_dense(dense, nn.Linear, (out_features, in_features), bias)
        self.weight = _shard_parameter(dense.weight, 1, rank, parts)  # (out, in / parts)
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_to_region(x, self.group)  # (..., in / parts)
        y = reduce_from_region(F.linear(x, self.weight), self.group)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


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


# ---- the loss -----------------------------------------------------------------------

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits: three all-reduces of (N,) tensors."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.input_dtype = logits.dtype
        logits = _loss_precision(logits)  # (N, V / p)
        width = logits.shape[-1]
        logits_max = logits.max(dim=-1).values  # (N,)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = labels - dist.get_rank(group) * width
        outside = (local < 0) | (local >= width)
        local = local.masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target, group=group)  # (N,) the label's logit, from its owner
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d logits = softmax - one_hot(label)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= (~outside).to(grad.dtype)
        grad = grad * grad_loss.unsqueeze(-1).to(grad.dtype)
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, group: Group = None,
                                 reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of logits split along the vocabulary, without gathering them.

    ``logits_shard``: (..., V / p), this rank's vocab slice (as a ColumnParallelLinear
    or a tied VocabParallelEmbedding head gives it); ``labels``: (...) global ids.
    Every rank returns the same loss, as ``F.cross_entropy`` would on the full logits:
    the mean over tokens whose label is not ``ignore_index``, or (...) per token with
    ``reduction="none"``. Half-precision logits are computed in float32.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(f"logits_shard {tuple(logits_shard.shape)} must be labels' shape "
                         f"{tuple(labels.shape)} plus a vocab dimension")
    active = _active(group)
    flat_logits = logits_shard.reshape(-1, logits_shard.shape[-1])  # (N, V / p)
    flat_labels = labels.reshape(-1)  # (N,)
    if active is None:
        losses = F.cross_entropy(_loss_precision(flat_logits), flat_labels, reduction="none",
                                 ignore_index=ignore_index)
    else:
        kept = flat_labels != ignore_index
        losses = _VocabParallelCrossEntropy.apply(flat_logits, flat_labels.masked_fill(~kept, 0), active)
        losses = losses * kept  # ignored tokens: zero loss, zero gradient
    if reduction == "none":
        return losses.view(labels.shape)
    return losses.sum() / (flat_labels != ignore_index).sum()
