"""The LM head and its cross-entropy in one step, chunked over tokens, so that a micro-batch's
full-vocabulary logits never exist; each chunk's logits are made again in backward.

    forward   hidden (N, H) -> chunk i (c, H) @ W^T -> logits (c, V/p) fp32 -> lse, loss[chunk i]   (freed)
    backward  chunk i again -> softmax - one_hot -> d hidden[chunk i] = g @ W,  d W += g^T @ hidden[chunk i]

Between forward and backward only (N,) float32 values per micro-batch are kept (the
log-sum-exp), whatever the vocabulary, so GPipe's micro-batches in flight and zero-bubble's
deferred weight gradients hold no logits either. With a tensor group, W is this rank's vocab
shard and each chunk's max and sums are all-reduced as :func:`vocab_parallel_cross_entropy`
does. On CUDA without a tensor group, Liger's fused linear cross-entropy (``liger-kernel``) or
``cut-cross-entropy`` runs instead when installed (``pip install pipegrid[gpu]``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipegrid.conf.schema import LossConfig
from pipegrid.tensor.cross_entropy import _loss_precision, vocab_parallel_cross_entropy
from pipegrid.tensor.mappings import Group, _active

__all__ = ["LMHeadInputs", "LMLoss", "linear_cross_entropy"]

log = logging.getLogger(__name__)
KERNELS = ("torch", "liger", "cut_cross_entropy")


@dataclass(frozen=True)
class LMHeadInputs:
    """What an LM head hands the loss instead of logits: the final hidden state and the head's
    weight (with a tensor group: this rank's vocab shard, and ``hidden`` already passed through
    ``copy_to_region``), so the loss can make the logits a chunk at a time."""

    hidden: torch.Tensor
    """(..., H) the final (normed) hidden state."""
    weight: torch.Tensor
    """(V / tensor, H) the head's weight (a tied embedding's, for tied models)."""
    bias: torch.Tensor | None = None
    """(V / tensor,) the head's bias, if it has one."""

    def logits(self) -> torch.Tensor:
        """The plain head's logits, (..., V / tensor)."""
        return F.linear(self.hidden, self.weight, self.bias)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(c, V / p) logits of one chunk, made in the weight's dtype as the plain head makes them; the
    softmax in float32 (float64 kept)."""
    return _loss_precision(F.linear(hidden, weight, bias))


def _label_logit(logits: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """(c,) each token's label logit where this rank holds the label's vocab id, else 0."""
    return logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)


def _will_run(ctx: Any, index: int) -> bool:
    """Whether this backward call needs input ``index``'s gradient (a split backward asks for the
    hidden state's and the weight's in separate calls)."""
    node = ctx.next_functions[index][0]
    if node is None or not ctx.needs_input_grad[index]:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # torch.autograd.grad() to a leaf cannot tell: compute it
        return True


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight^T (+ bias)``, chunk by chunk over the tokens."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_tokens: int, group: Group) -> torch.Tensor:
        # hidden (N, H); weight (V / p, H); labels (N,) global ids, ignored tokens already set to 0
        width = weight.shape[0]
        offset = dist.get_rank(group) * width if group is not None else 0
        local = labels - offset
        owned = (local >= 0) & (local < width)
        local = local.masked_fill(~owned, 0)
        losses = torch.empty(labels.shape, dtype=_loss_precision(hidden[:0]).dtype, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = _chunk_logits(hidden[rows], weight, bias)  # (c, V / p)
            maxes = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(maxes.unsqueeze(-1))
            target = _label_logit(logits, local[rows], owned[rows])
            sums = torch.stack([target, logits.exp_().sum(dim=-1)])  # (2, c) one all-reduce for both
            del logits
            if group is not None:
                dist.all_reduce(sums, group=group)
            log_sums = sums[1].log()
            losses[rows] = log_sums - sums[0]
            lse[rows] = maxes + log_sums
        ctx.save_for_backward(hidden, weight, bias, local, owned, lse)
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, local, owned, lse = ctx.saved_tensors
        want_hidden, want_weight = _will_run(ctx, 0), _will_run(ctx, 1)
        want_bias = bias is not None and _will_run(ctx, 2)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # weight gradients summed over chunks in float32, whatever the weight's dtype
        summed = lse.dtype  # float32, or float64 for float64 weights
        grad_weight = torch.zeros(weight.shape, dtype=summed, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=summed, device=weight.device) if want_bias else None
        if want_hidden or want_weight or want_bias:
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                probs = _chunk_logits(hidden[rows], weight, bias).sub_(lse[rows].unsqueeze(-1)).exp_()
                # d loss / d logits = softmax - one_hot(label) (a scatter: no host sync on CUDA)
                probs.scatter_add_(1, local[rows].unsqueeze(-1), -owned[rows].to(probs.dtype).unsqueeze(-1))
                probs.mul_(grad_losses[rows].unsqueeze(-1))
                if grad_bias is not None:
                    grad_bias += probs.sum(dim=0)
                grad_logits = probs.to(weight.dtype)  # (c, V / p), as the plain head's backward gets it
                del probs
                if grad_hidden is not None:
                    torch.mm(grad_logits, weight, out=grad_hidden[rows])
                if grad_weight is not None and grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows])  # in place: no (V / p, H) temporary
                elif grad_weight is not None:
                    grad_weight += grad_logits.t().mm(hidden[rows])  # a half-precision product, summed in fp32
                del grad_logits  # (the same storage as probs in fp32): freed before the next chunk's logits
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def _chunked_mean(inputs: LMHeadInputs, labels: torch.Tensor, chunk_tokens: int, group: Group,
                  ignore_index: int) -> torch.Tensor:
    hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])  # (N, H)
    flat = labels.reshape(-1).to(hidden.device)  # (N,)
    kept = flat != ignore_index
    losses = _ChunkedLinearCrossEntropy.apply(hidden, inputs.weight, inputs.bias, flat.masked_fill(~kept, 0),
                                              chunk_tokens, group)
    return (losses * kept).sum() / kept.sum()  # ignored tokens: zero loss, zero gradient


def _plain_mean(inputs: LMHeadInputs, labels: torch.Tensor, group: Group, ignore_index: int) -> torch.Tensor:
    """The unfused loss: whole logits, then cross-entropy in float32 (the reference)."""
    logits = inputs.logits()
    return vocab_parallel_cross_entropy(logits, labels.to(logits.device), group, ignore_index=ignore_index)


def _kernel_mean(kernel: str, inputs: LMHeadInputs, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A maintained CUDA kernel (dense heads only): Liger's or cut-cross-entropy's."""
    hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])
    flat = labels.reshape(-1).to(hidden.device)
    if kernel == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)(inputs.weight, hidden, flat, inputs.bias)
    else:
        from cut_cross_entropy import linear_cross_entropy as cce

        loss = cce(hidden, inputs.weight, flat, bias=inputs.bias, ignore_index=ignore_index, reduction="mean")
    return loss[0] if isinstance(loss, tuple) else loss  # some versions also return a z-loss


def available_kernel(device: torch.device, group: Group = None) -> str:
    """The kernel the chunked loss runs on: Liger's, then cut-cross-entropy's, on CUDA without a
    tensor group when installed; the torch path otherwise."""
    if device.type != "cuda" or _active(group) is not None:
        return "torch"
    for kernel, package in (("liger", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(package) is not None:
            return kernel
    return "torch"


def linear_cross_entropy(inputs: LMHeadInputs, labels: torch.Tensor, group: Group = None, *,
                         chunk_tokens: int = 1024, ignore_index: int = -100, kernel: str = "torch") -> torch.Tensor:
    """Mean cross-entropy of ``inputs.logits()`` against ``labels`` (...), ``ignore_index`` left out,
    computed ``chunk_tokens`` tokens at a time; equal, within float32 rounding, to
    ``vocab_parallel_cross_entropy(inputs.logits().float(), labels, group)`` and its gradients for
    the hidden state, the weight and the bias. ``kernel`` (see :func:`available_kernel`):
    ``"torch"``, ``"liger"`` or ``"cut_cross_entropy"``; the last two only on CUDA, without a group.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if inputs.hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(inputs.hidden.shape)} must be labels' shape {tuple(labels.shape)} "
                         "plus a hidden dimension")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    active = _active(group)
    if kernel != "torch":
        if active is not None or not inputs.hidden.is_cuda:
            raise ValueError(f"kernel={kernel!r} runs on CUDA without a tensor group; use kernel='torch'")
        return _kernel_mean(kernel, inputs, labels, ignore_index)
    return _chunked_mean(inputs, labels, chunk_tokens, active, ignore_index)


def _saves_memory(inputs: LMHeadInputs, tokens: int, chunk_tokens: int) -> bool:
    """``loss.chunked=auto``: chunk when there is more than one chunk and the logits are wider than
    the hidden state (a real vocabulary, not a character-level one, whose logits are cheap)."""
    vocab, hidden = inputs.weight.shape
    return tokens > chunk_tokens and vocab > hidden


class LMLoss:
    """An LM's loss of one micro-batch, from :class:`LMHeadInputs` (chunked, per ``config``) or from
    logits (a head that is not fused, or evaluation, where heads still give logits).

    ``config`` None: follow the ``loss:`` section of the config the engine is initialised with
    (:meth:`configure`); until then heads give logits, so a model called on its own does as before.
    ``shift_labels``: labels are the inputs, shifted here as transformers' ``ForCausalLMLoss`` does
    (the last position gets ``ignore_index``). ``plain``: the loss of logits (labels unshifted),
    default the (vocab-parallel) cross-entropy. The kernel chosen is logged once, at the first chunked call.
    """

    def __init__(self, config: LossConfig | None = None, group: Group = None, *, shift_labels: bool = False,
                 ignore_index: int = -100, plain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 ) -> None:
        self.config = config
        self.group = group
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self.plain = plain
        self.kernel: str | None = None
        """The kernel of the chunked calls (None until the first), logged when first chosen."""

    def configure(self, config: LossConfig) -> None:
        """Take the engine's ``loss:`` section, unless the model was built with its own."""
        if self.config is None:
            self.config = config

    def fuses(self) -> bool:
        """Whether heads should hand this loss :class:`LMHeadInputs` (``loss.chunked`` is not false)."""
        return self.config is not None and self.config.chunked != "false"

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, LMHeadInputs):
            return self._plain(output, labels)
        tokens = labels.numel()
        config = self.config if self.config is not None else LossConfig()
        if config.chunked != "true" and not _saves_memory(output, tokens, config.chunk_tokens):
            return self._plain(output.logits(), labels)
        if self.shift_labels:
            labels = F.pad(labels, (0, 1), value=self.ignore_index)[..., 1:]
        kernel = available_kernel(output.hidden.device, self.group)
        if kernel != self.kernel:
            self.kernel = kernel
            log.info("loss: LM head + cross-entropy chunked (%s kernel, %d tokens per chunk, %d per micro-batch)",
                     kernel, config.chunk_tokens, tokens)
        return linear_cross_entropy(output, labels, self.group, chunk_tokens=config.chunk_tokens,
                                    ignore_index=self.ignore_index, kernel=kernel)

    def _plain(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.plain is not None:
            return self.plain(logits, labels)
        if self.shift_labels:
            labels = F.pad(labels, (0, 1), value=self.ignore_index)[..., 1:]
        return vocab_parallel_cross_entropy(logits, labels.to(logits.device), self.group, ignore_index=self.ignore_index)
