"""``engine.generate``'s arguments, checked before any work: every rank reaches the same
verdict from the same arguments and the module's specs, so a refusal never leaves a peer
waiting on a message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipegrid.pipe.kv_cache import missing_cache_protocol
from pipegrid.pipe.sampling import Sampling

__all__ = ["GenerateRequest", "check_request"]


@dataclass(frozen=True)
class GenerateRequest:
    """A checked ``engine.generate`` call (``engine_generate.check_request`` builds it)."""

    input_ids: torch.Tensor
    """(B, L) int64 prompts, left padded."""
    attention_mask: torch.Tensor
    """(B, L) int64, 1 for real tokens."""
    max_new_tokens: int
    sampling: Sampling
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    seed: int
    micro_batches: int
    """How many micro-batches the batch is split into (each in flight at once)."""

    @property
    def batch_rows(self) -> list[torch.Tensor]:
        """The batch's row indices of each micro-batch, as even as the batch allows."""
        return list(torch.arange(self.input_ids.shape[0]).tensor_split(self.micro_batches))


def check_request(module: Any, *, pipe: int, tensor: int, input_ids: Any,
                  attention_mask: Any, max_new_tokens: Any, sampling: Sampling, eos_token_id: Any,
                  pad_token_id: Any, seed: Any, micro_batches: int | None, default_micro_batches: int) -> GenerateRequest:
    """Every refusal ``engine.generate`` makes, each naming the fix, in one place."""
    _check_layout(module, tensor)
    ids, mask = _check_prompts(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    limit = getattr(module, "max_positions", None)
    length = ids.shape[1]
    if limit is not None and length > limit:
        raise ValueError(f"the prompts are {length} tokens long but the model has {limit} positions; "
                         f"shorten the prompts to at most {limit} tokens")
    if limit is not None and length + max_new_tokens - 1 > limit:
        raise ValueError(f"{length} prompt tokens + max_new_tokens={max_new_tokens} need {length + max_new_tokens - 1} "
                         f"positions but the model has {limit}; set max_new_tokens <= {limit - length + 1}")
    eos = _token_ids(eos_token_id, "eos_token_id")
    pad = _pad_id(pad_token_id, eos)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    chosen = _micro_batches(micro_batches, default_micro_batches, ids.shape[0])
    return GenerateRequest(ids, mask, max_new_tokens, sampling, eos, pad,
                           int(torch.randint(2**62, ())) if seed is None else seed, chosen)


def _check_layout(module: Any, tensor: int) -> None:
    """Any pipe x tensor degree and chunk placement runs; at tensor > 1 the module must say
    whether its logits are split over the vocabulary (``vocab_parallel_group``, None: whole),
    so the last stage knows whether to gather them before it chooses a token."""
    if tensor > 1 and not hasattr(module, "vocab_parallel_group"):
        raise ValueError(f"engine.generate at topology.tensor={tensor} needs {type(module).__name__}."
                         "vocab_parallel_group: the tensor group its logits are split over, or None when every "
                         "tensor rank holds whole logits; define it on the module (pipegrid.hf models do)")
    missing = missing_cache_protocol(module.layer_specs)
    if missing:
        raise TypeError(f"engine.generate needs every layer to run with a KV cache; {', '.join(missing)} "
                        "define no forward_cached(x, cache, step). Implement pipegrid.CachedLayer on them "
                        "(a stateless layer: `return self(x)`; see docs/generate.md)")


def _check_prompts(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise TypeError("input_ids must be a 2-D integer tensor (batch, prompt length), got "
                        f"{type(input_ids).__name__}{list(getattr(input_ids, 'shape', []))}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token of one prompt, got shape {list(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.long().cpu(), torch.ones_like(input_ids, dtype=torch.long).cpu()
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}")
    mask = attention_mask.long().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        raise ValueError("engine.generate takes left-padded prompts: each attention_mask row must be 0s then 1s "
                         "ending in a 1; pad on the left (tokenizer.padding_side = 'left')")
    return input_ids.long().cpu(), mask


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                        for v in values):
        raise ValueError(f"{name} must be a token id (int >= 0) or a list of them, got {value!r}")
    return tuple(values)


def _pad_id(pad_token_id: Any, eos: tuple[int, ...]) -> int:
    if pad_token_id is None:
        return eos[0] if eos else 0  # as transformers: finished sequences are padded with the EOS id
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id (int >= 0), got {pad_token_id!r}")
    return pad_token_id


def _micro_batches(requested: int | None, default: int, batch: int) -> int:
    if requested is None:
        return max(1, min(default, batch))
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= batch:
        raise ValueError(f"micro_batches must be an int in [1, batch size {batch}], got {requested!r}")
    return requested
