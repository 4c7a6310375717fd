"""Tiny transformers causal LMs for the pipegrid.hf tests, saved by transformers itself in
several safetensors shards, and their data: micro-batches of token ids, optionally
padded (attention mask 0, label -100 on padding).

Dropout is off and every model uses eager attention, on both sides of each comparison.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

VOCAB = 64
SEQ_LEN = 6
ATTN = "eager"

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_config(family: str, n_layer: int = 2, **overrides: Any) -> Any:
    """A few-thousand-parameter config of ``family``: gpt2 (tied), llama (GQA, untied), qwen2 (tied, q/k/v bias),
    mistral (GQA, untied, a sliding window shorter than the sequence), phi3 (GQA, packed projections)."""
    if family == "gpt2":
        config = GPT2Config(n_embd=16, n_layer=n_layer, n_head=2, vocab_size=VOCAB, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    elif family == "llama":
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layer, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layer, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    elif family == "mistral":
        config = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layer, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, sliding_window=4,
                               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    elif family == "phi3":  # packed qkv_proj (GQA) and gate_up_proj
        config = Phi3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layer, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                            original_max_position_embeddings=32, tie_word_embeddings=False, resid_pdrop=0.0,
                            embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    else:
        raise ValueError(f"unknown test family {family!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


FAMILIES = ("gpt2", "llama", "qwen2")


def save_tiny(family: str, directory: str, seed: int = 0, n_layer: int = 2, **overrides: Any) -> str:
    """A randomly initialised tiny model saved by transformers in several shards (with an index)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layer, **overrides), attn_implementation=ATTN)
    model.save_pretrained(directory, max_shard_size="8KB")
    return directory


def load_reference(directory: str, **kwargs: Any) -> torch.nn.Module:
    """The one-process transformers model of a saved directory."""
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation=ATTN, **kwargs)


def lm_batches(num_micro_batches: int, micro_batch_size: int = 2, seq_len: int = SEQ_LEN, seed: int = 0,
               padded: bool = False) -> list:
    """``(ids, labels)`` micro-batches, or ``((ids, attention_mask), labels)`` with ``padded``:
    then the first row is right-padded by 2 and the second left-padded by 1 (labels -100 there)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_micro_batches):
        ids = torch.randint(0, VOCAB, (micro_batch_size, seq_len), generator=gen)
        labels = ids.clone()
        if not padded:
            out.append((ids, labels))
            continue
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        mask[1 % micro_batch_size, :1] = 0
        labels[mask == 0] = -100
        out.append(((ids, mask), labels))
    return out


def reference_step(model: torch.nn.Module, batches: list, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """One step of the transformers model over a global batch by gradient accumulation; the mean loss."""
    total = 0.0
    for inputs, labels in batches:
        ids, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / len(batches)).backward()
        total += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batches)


# ---- many families at once (one process): the generic path against each family's own forward ----
_SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=4, vocab_size=VOCAB, max_position_embeddings=32, sliding_window=3, pad_token_id=None,
              bos_token_id=0, eos_token_id=1, n_embed=16, n_layer=3, n_head=4, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, shared_expert_intermediate_size=16)
_DROPOUT = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "embed_dropout",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")

# families whose config declares base_model_pp_plan (plus gpt2, by pipegrid's adapter): sliding
# windows (mistral, gemma2/3), embedding scaling (gemma), logit soft-capping (gemma2), multipliers
# (granite), parallel attention and partial rotary (gpt_neox, phi), q/k norms (qwen3, olmo2), experts whose
# stored per-expert tensors transformers stacks while loading (qwen2_moe)
SWEEP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "gpt_neox", "olmo2",
         "granite", "starcoder2", "cohere", "qwen2_moe", "gpt2")


def sweep_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config of any family transformers knows, dropout off (only the keys it has are set)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    # through the constructor, so derived fields (layer_types, sliding patterns) follow the sizes
    kwargs = {key: value for key, value in {**_SMALL, **{k: 0.0 for k in _DROPOUT}, **overrides}.items()
              if hasattr(default, key)}
    return config_class(**kwargs)


def save_config(config: Any, directory: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)
    model.save_pretrained(directory, max_shard_size="8KB")
    return directory


def assert_ranks_match(name: str, per_rank: list[dict], losses: list[float], state: dict, tied: bool,
                       rtol: float, atol: float, loss_atol: float | None = None) -> None:
    """Every rank's losses equal the reference's, and every tensor it holds (whole, after any
    gather) equals the reference's; every stored parameter is compared on some rank."""
    seen = set()
    for rank, result in enumerate(per_rank):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=rtol,
                                   atol=atol if loss_atol is None else loss_atol,
                                   msg=lambda m: f"{name} rank {rank} losses: {m}")
        for key, value in result["tensors"].items():
            torch.testing.assert_close(value, state[key], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} rank {rank} {key}: {m}")
            seen.add(key)
    stored = {k for k in state if not (k == "lm_head.weight" and tied)}
    assert seen >= stored, f"{name}: parameters never compared: {stored - seen}"
