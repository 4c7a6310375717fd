"""A transformers ``config.json`` as the planner's TransformerConfig (``--hf-config``): the
sizes pipegrid.hf will build, read from the JSON alone (the planner never imports transformers)."""

from __future__ import annotations

import json
import os
from typing import Any

from pipegrid.plan.model import TransformerConfig

__all__ = ["transformer_config_from_hf"]

# families whose MLP is up -> activation -> down (two matrices); the others gate (three)
_UNGATED = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "phi", "starcoder2", "opt", "bloom", "falcon")
# the same size under each family's name, first match wins
_KEYS = {"layers": ("num_hidden_layers", "n_layer"), "hidden": ("hidden_size", "n_embd"),
         "heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
         "ffn": ("intermediate_size", "n_inner"), "vocab": ("vocab_size",)}


def _read(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            stored = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--hf-config: cannot read {file} ({error}); pass a transformers config.json or "
                         "its checkpoint directory") from None
    return {**stored.get("text_config", {}), **stored}


def transformer_config_from_hf(path: str, **training: Any) -> TransformerConfig:
    """The model of ``path`` (config.json or its directory); ``training`` sets seq_len, global_batch,
    dtype and recompute (the training run's, not the checkpoint's)."""
    stored = _read(path)
    sizes: dict[str, Any] = {}
    for field, keys in _KEYS.items():
        value = next((stored[k] for k in keys if stored.get(k) is not None), None)
        if value is not None:
            sizes[field] = value
    missing = [field for field in ("layers", "hidden", "heads", "vocab") if field not in sizes]
    if missing:
        raise ValueError(f"--hf-config: {path} gives no {missing} (looked for {[_KEYS[m] for m in missing]}); "
                         "is it a decoder-only causal LM's config.json?")
    model_type = stored.get("model_type", "")
    name = stored.get("_name_or_path") or model_type or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return TransformerConfig(name=str(name), **sizes, gated_mlp=model_type not in _UNGATED,
                             tied=bool(stored.get("tie_word_embeddings", True)), **training)
