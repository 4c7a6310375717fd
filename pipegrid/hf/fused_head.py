"""The causal LM's head when the loss is fused: the final hidden state and the head's weight go
to :class:`pipegrid.tensor.LMLoss`, which makes the logits a chunk of tokens at a time.

Only a head whose logits are ``hidden @ W^T (+ b)`` and a loss that is transformers'
``ForCausalLMLoss`` can be fused; a model whose own forward scales or soft-caps the logits
(Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``)
is found by comparing its logits with the plain product once, on one token, and keeps them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from pipegrid.hf.skeleton import Skeleton
from pipegrid.tensor import ColumnParallelLinear, LMHeadInputs, LMLoss, all_gather_sequence, copy_to_region

log = logging.getLogger(__name__)


class FusableHead:
    """``head(hidden, training)``: logits, or :class:`LMHeadInputs` when the loss fuses them.

    Fused only under autograd (training): evaluation and generation get logits as before, so
    ``eval_batch(return_outputs=True)`` still returns them.
    """

    def __init__(self, skeleton: Skeleton, loss: LMLoss) -> None:
        self.skeleton = skeleton
        self.loss = loss
        self._fusable: bool | None = None  # decided at the first fused call, from real weights

    def __call__(self, hidden: torch.Tensor, training: bool) -> torch.Tensor | LMHeadInputs:
        if not (torch.is_grad_enabled() and self.loss.fuses() and self._check(hidden)):
            return self.skeleton.logits(hidden, training)
        head = self.skeleton.shell.get_submodule(self.skeleton.plan.head)
        if isinstance(head, ColumnParallelLinear) and head.sequence_parallel:  # (B, T / tensor, H) -> (B, T, H)
            hidden = all_gather_sequence(hidden, head.group)  # backward: the partial gradients reduce-scattered
        elif isinstance(head, ColumnParallelLinear):  # as its forward does: the input's gradient all-reduced
            hidden = copy_to_region(hidden, head.group)
        return LMHeadInputs(hidden, head.weight, getattr(head, "bias", None))

    def _check(self, hidden: torch.Tensor) -> bool:
        if self._fusable is None:
            reason = self._unfusable_reason(hidden)
            self._fusable = reason is None
            if reason is not None:
                config = self.loss.config
                if config is not None and config.chunked == "true":
                    raise ValueError(f"loss.chunked=true: {self.skeleton.plan.class_name} {reason}, so its head "
                                     "cannot be fused with the loss; set loss.chunked=auto (keeps the logits) or false")
                log.info("loss: %s %s; its head keeps full logits", self.skeleton.plan.class_name, reason)
        return self._fusable

    def _unfusable_reason(self, hidden: torch.Tensor) -> str | None:
        loss_function = getattr(self.skeleton.shell, "loss_function", None)
        if getattr(loss_function, "__name__", None) != "ForCausalLMLoss":
            return f"has its own loss ({getattr(loss_function, '__name__', loss_function)!r}, not ForCausalLMLoss)"
        head = self.skeleton.shell.get_submodule(self.skeleton.plan.head)
        weight: Any = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return f"has an LM head ({type(head).__name__}) without a 2-D weight"
        with torch.no_grad(), self.skeleton.sequence_parallel.off():  # one token: no collective
            probe = hidden.detach()[..., :1, :]  # one token of each row
            own = self.skeleton.logits(probe, False)
            plain = F.linear(probe, weight, getattr(head, "bias", None))
            # bit for bit: the same matmul on the same tensors; a soft cap near 0 is within any tolerance
            if own.shape != plain.shape or not torch.equal(own.float(), plain.float()):
                return "computes its logits as more than hidden @ W^T (a scale or a soft cap)"
        return None
