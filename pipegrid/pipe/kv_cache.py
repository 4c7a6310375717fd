"""The cache protocol ``engine.generate`` runs a stage with: what a layer implements, what
a stage's cache is, and the per-layer caches LayerSpec models get by default.

A model stage keeps the attention keys and values of its own layers only, one cache per
micro-batch. A layer that runs under ``generate`` implements::

    def forward_cached(self, x, cache, step: DecodeStep) -> output

``x`` is what the layer's ``forward`` gets (the new tokens only: the whole prompt at the
prefill, one token per sequence after), ``cache`` its own store (a dict it fills as it
likes, kept between steps; a model may give its stages another store through
``new_generation_cache``) and ``step`` the positions and padding mask of the new tokens.
A layer without state answers ``return self(x)``; a tied position with a ``forward_fn``
(the LM head of a tied embedding) and torch's own position-wise modules (``POSITIONWISE``:
Linear, Embedding, norms, activations, dropout) are called as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["CachedLayer", "DecodeStep", "LayerCaches", "POSITIONWISE", "StageCache", "missing_cache_protocol",
           "runs_as_in_training"]

POSITIONWISE: tuple[type, ...] = (
    torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.Dropout, torch.nn.Identity,
    torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Tanh,
)
"""torch modules that treat each position alone: the new tokens alone give the same output, so
they run under generate without a cache (their subclasses too)."""


def runs_as_in_training(layer: Any) -> bool:
    """A module or class generate calls as ``layer(x)``: position-wise, without ``forward_cached``."""
    cls = layer if isinstance(layer, type) else type(layer)
    return issubclass(cls, POSITIONWISE) and not hasattr(cls, "forward_cached")


@dataclass(frozen=True)
class DecodeStep:
    """Where the new tokens of one forward stand, for every sequence of a micro-batch."""

    positions: torch.Tensor
    """(B, T) int64: each new token's position, counted from the sequence's first real
    token (left padding counts out), as transformers' ``generate`` counts them."""
    attention_mask: torch.Tensor
    """(B, past + T) int64: 1 where a token (cached or new) is real, 0 for left padding."""

    @property
    def padded(self) -> bool:
        """Whether any sequence has padding (an all-ones mask may be dropped, as transformers does)."""
        return not bool(self.attention_mask.all())


@runtime_checkable
class CachedLayer(Protocol):
    """A layer that runs under ``engine.generate`` (see the module docstring)."""

    def forward_cached(self, x: Any, cache: Any, step: DecodeStep) -> Any: ...


class StageCache(Protocol):
    """Everything one model stage keeps for one micro-batch between generation steps."""

    def for_layer(self, index: int) -> Any:
        """The store handed to layer ``index`` (global layer index) as ``cache``."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (sequences) of every cached tensor: finished ones leave."""

    def nbytes(self) -> int:
        """Bytes of the tensors held."""


class LayerCaches:
    """The default StageCache: one dict per layer, its tensors batch-first."""

    def __init__(self) -> None:
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    def for_layer(self, index: int) -> dict[str, torch.Tensor]:
        return self._layers.setdefault(index, {})

    def select_rows(self, rows: torch.Tensor) -> None:
        for store in self._layers.values():
            for key, tensor in store.items():
                store[key] = tensor.index_select(0, rows.to(tensor.device))

    def nbytes(self) -> int:
        return sum(t.nbytes for store in self._layers.values() for t in store.values())


def missing_cache_protocol(layers: Sequence[Any]) -> list[str]:
    """Class names of the layers (LayerSpecs, modules or callables) that ``generate`` cannot
    run: neither ``forward_cached`` nor a tied ``forward_fn``. Read from the specs, so every
    rank finds the same answer without building anything."""
    missing = []
    for layer in layers:
        if getattr(layer, "forward_fn", None) is not None:
            continue
        cls = getattr(layer, "typename", None)
        target = cls if cls is not None else layer
        if isinstance(target, torch.nn.Module) or isinstance(target, type):
            if not hasattr(target, "forward_cached") and not runs_as_in_training(target):
                name = getattr(layer, "class_name", None) or getattr(target, "__name__", type(target).__name__)
                missing.append(name)
    return sorted(set(missing))
