"""Tensor-parallel attention's core draws its dropout from the tensor-parallel stream: each rank
holds its own heads, so each needs its own masks (``pipegrid.tensor.random``).

transformers' attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, ...)`` with ``dropout=``. A split attention module holds its own
copy of the config (``tp_plan._localise_heads``); routing sets that copy's implementation to
:data:`ATTENTION_NAME`, a registered function that runs the module's own implementation under the
stream's fork. The output projection and the dropout after it (GPT-2's ``resid_dropout``, on the
replicated hidden state) run outside it, on the default generator, as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipegrid.tensor.random import TensorParallelRNG

__all__ = ["ATTENTION_NAME", "route_attention"]

ATTENTION_NAME = "pipegrid_tensor_parallel"


def _tensor_parallel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, *args: Any, dropout: float = 0.0,
                               **kwargs: Any) -> Any:
    """The module's own attention function; under its tensor-parallel stream when it drops anything."""
    core: Callable[..., Any] = module._pipegrid_core_attention
    rng: TensorParallelRNG = module.tensor_parallel_rng
    if not dropout:  # evaluation, generation, dropout 0: nothing to draw (and nothing for compile to break on)
        return core(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
    return rng.run(core, module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)


def _core_attention(module: nn.Module, implementation: str | None) -> Callable[..., Any] | None:
    """The function ``module`` would call: the registered one, or its family's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS[implementation] if implementation in ALL_ATTENTION_FUNCTIONS else None


def route_attention(module: nn.Module, rng: TensorParallelRNG) -> bool:
    """Make split attention ``module`` (holding its own config copy) call its core attention under
    ``rng``'s fork; False where it cannot be routed (no config of its own, GPT-2's reordered eager
    path, an implementation not found), which leaves it on the shared stream."""
    from transformers import AttentionInterface

    config = getattr(module, "config", None)
    if not hasattr(module, "head_dim"):  # an MLP beside it holds split layers and a config copy too
        return False
    implementation = getattr(config, "_attn_implementation", None)
    if config is None or getattr(module, "reorder_and_upcast_attn", False) or implementation == ATTENTION_NAME:
        return implementation == ATTENTION_NAME
    core = _core_attention(module, implementation)
    if core is None:
        return False
    AttentionInterface.register(ATTENTION_NAME, _tensor_parallel_attention)  # idempotent
    module._pipegrid_core_attention = core
    module.tensor_parallel_rng = rng
    config._attn_implementation = ATTENTION_NAME
    return True
