"""Cross-entropy of logits split along the vocabulary, computed without gathering them:
three all-reduces of one value per token (max, label logit, sum of exponentials)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipegrid.tensor.mappings import Group, _active

__all__ = ["vocab_parallel_cross_entropy"]


def _loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits (exp/sum lose too much), float64 kept as is."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


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
