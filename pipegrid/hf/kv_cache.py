"""A pipeline stage's KV cache for a transformers model: a ``DynamicCache`` of the whole
model of which the stage fills only its own layers.

The base model's forward, which the stage runs to get each layer's arguments, asks the
cache for the past length of layer 0 (positions, mask sizes); on a later stage layer 0
is another stage's and empty, so every such question is answered from the stage's first
own layer of the same kind (sliding window or full attention).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["StageDynamicCache"]


class StageDynamicCache(DynamicCache):
    """transformers' DynamicCache for one stage's layers (``owned``: global layer indices)."""

    def __init__(self, config: Any, owned: list[int]) -> None:
        super().__init__(config=config)
        self.owned = owned

    def _reference(self, layer_idx: int) -> int:
        if layer_idx in self.owned or not self.owned or layer_idx >= len(self.layers):
            return layer_idx
        sliding = getattr(self.layers[layer_idx], "is_sliding", False)
        same = [i for i in self.owned if i < len(self.layers) and getattr(self.layers[i], "is_sliding", False) == sliding]
        return (same or self.owned)[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._reference(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._reference(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._reference(layer_idx))

    # --- the StageCache protocol (pipegrid.pipe.kv_cache) ----------------------------
    def for_layer(self, index: int) -> StageDynamicCache:
        return self  # transformers' layers index the one cache themselves

    def select_rows(self, rows: torch.Tensor) -> None:
        for i in self.owned:
            layer = self.layers[i]
            if getattr(layer, "is_initialized", False):
                layer.batch_select_indices(rows)

    def nbytes(self) -> int:
        total = 0
        for i in self.owned:
            layer = self.layers[i]
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.nbytes
        return total
