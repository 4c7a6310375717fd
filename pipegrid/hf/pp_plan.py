"""Which modules of a transformers causal LM become which pipeline layers, decided before
anything is built: the config class's ``base_model_pp_plan`` (or pipegrid's adapter plan
for GPT-2, which declares none), checked against the model's module tree.

A plan lists the base model's children in forward order, each with its inputs and
outputs: ``embed_tokens: input_ids -> inputs_embeds``, ``layers: hidden_states,
attention_mask -> hidden_states``, ``norm: hidden_states -> hidden_states``. pipegrid
turns that into the layer list ``embedding, prefix, decoder layer 0..L-1, final norm,
LM head``; the head comes from the causal-LM class (its ``_pp_plan`` or output embeddings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

PlanEntry = tuple[Sequence[str], Sequence[str]]

# GPT-2 declares no base_model_pp_plan; this is the one its GPT2Model.forward follows.
ADAPTER_PLANS: dict[str, dict[str, PlanEntry]] = {
    "gpt2": {
        "wte": (["input_ids"], ["inputs_embeds"]),
        "wpe": (["position_ids"], ["position_embeds"]),
        "drop": (["hidden_states"], ["hidden_states"]),
        "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "ln_f": (["hidden_states"], ["hidden_states"]),
    },
}

_PLAN_EXAMPLE = ("{'embed_tokens': (['input_ids'], ['inputs_embeds']), 'layers': (['hidden_states', "
                 "'attention_mask'], ['hidden_states']), 'norm': (['hidden_states'], ['hidden_states'])}")


@dataclass(frozen=True)
class StagePlan:
    """Where each pipeline role lives in the causal LM (names of attributes)."""

    class_name: str
    """The causal-LM class, e.g. LlamaForCausalLM."""
    base_prefix: str
    """The causal LM's attribute holding the base model ("model", "transformer")."""
    embed: str
    """Base-model child mapping input_ids to inputs_embeds."""
    prefix: tuple[str, ...]
    """Base-model children between the embedding and the decoder layers (positions, dropout)."""
    layers: str
    """Base-model ModuleList of decoder layers."""
    norm: str
    """Base-model child applied after the last decoder layer."""
    head: str
    """Causal-LM child computing the logits."""
    tied: bool
    """The head's weight is the embedding's (tie_word_embeddings)."""


def read_config_json(path: str) -> dict[str, Any]:
    """``path/config.json`` as a dict; a missing or broken file says so."""
    if not os.path.isdir(path):
        raise ValueError(f"hf.from_pretrained: {path!r} is not a directory; pass a local directory written by "
                         "save_pretrained (config.json + *.safetensors), e.g. one in your HF_HOME cache "
                         "(~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"hf.from_pretrained: {path!r} has no config.json; it must be a directory written by "
                         "transformers' save_pretrained")
    try:
        with open(config_file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"hf.from_pretrained: cannot read {config_file}: {error}") from None


def causal_lm_class(config: Any) -> type:
    """The AutoModelForCausalLM class for ``config``; anything else is refused by name."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} ({type(config).__name__}) has no AutoModelForCausalLM class in "
                         "transformers; pipegrid.hf pipelines causal language models only")
    return AutoModelForCausalLM._model_mapping[type(config)]


def plan_for(config: Any, pp_plan: Mapping[str, PlanEntry] | None = None) -> dict[str, PlanEntry]:
    """The pipeline plan: ``pp_plan`` if given, else the config's, else pipegrid's adapter
    (a config of no causal LM is refused first, naming it)."""
    causal_lm_class(config)
    if pp_plan is not None:
        return dict(pp_plan)
    declared = getattr(type(config), "base_model_pp_plan", None) or getattr(config, "base_model_pp_plan", None)
    if declared:
        return dict(declared)
    model_type = getattr(config, "model_type", "")
    if model_type in ADAPTER_PLANS:
        return dict(ADAPTER_PLANS[model_type])
    raise ValueError(
        f"{type(config).__name__} (model_type {model_type!r}) cannot be cut into pipeline stages: it declares no "
        f"base_model_pp_plan and pipegrid.hf has no adapter for it (adapters: {', '.join(sorted(ADAPTER_PLANS))}). "
        f"Pass pp_plan= naming its base model's embedding, decoder-layer ModuleList and final norm in forward "
        f"order, e.g. pp_plan={_PLAN_EXAMPLE}, or use a model whose config declares one (Llama, Mistral, "
        "Qwen2/3, Gemma, Phi-3, GPT-NeoX, ...)")


def resolve(shell: nn.Module, plan: Mapping[str, PlanEntry]) -> StagePlan:
    """Check ``plan`` against the (meta-device) model ``shell`` and name each pipeline role."""
    name = type(shell).__name__
    base_prefix = shell.base_model_prefix
    base = getattr(shell, base_prefix, None)
    if not isinstance(base, nn.Module) or base is shell:
        raise ValueError(f"{name} keeps no base model under {base_prefix!r}; pipegrid.hf needs a causal LM "
                         "made of a base model and an LM head")
    children = dict(base.named_children())
    keys = list(plan)
    missing = [key for key in keys if key not in children]
    if missing:
        raise ValueError(f"{name}: the pipeline plan names {missing}, which its base model "
                         f"{type(base).__name__} does not have (its children: {sorted(children)}); fix pp_plan")
    lists = [key for key in keys if isinstance(children[key], nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"{name}: the pipeline plan must name exactly one ModuleList of decoder layers, got "
                         f"{lists or 'none'} in {keys}")
    at = keys.index(lists[0])
    if at == 0 or at != len(keys) - 2 or list(plan[keys[0]][0]) != ["input_ids"]:
        raise ValueError(f"{name}: pipegrid.hf expects the plan embedding (input_ids) -> [prefix modules] -> "
                         f"decoder layers -> final norm, got {keys}; its plan does not fit that shape")
    _refuse_unplanned_parameters(name, base, set(keys))
    return StagePlan(class_name=name, base_prefix=base_prefix, embed=keys[0], prefix=tuple(keys[1:at]),
                     layers=lists[0], norm=keys[-1], head=_head_name(shell), tied=_is_tied(shell, keys[0]))


def _refuse_unplanned_parameters(name: str, base: nn.Module, planned: set[str]) -> None:
    """Children outside the plan are recomputed on every stage (rotary tables): they may hold no weights."""
    weighted = [child for child, module in base.named_children()
                if child not in planned and any(True for _ in module.parameters())]
    if weighted:
        raise ValueError(f"{name}: base-model modules {weighted} have weights but no place in the pipeline plan "
                         "(pipegrid.hf recomputes unplanned modules on every stage and they may only hold "
                         "buffers); this architecture needs its own pp_plan placing them")


def _head_name(shell: nn.Module) -> str:
    planned = [key for key in (getattr(type(shell), "_pp_plan", None) or {}) if "." not in key]
    if len(planned) == 1:
        return planned[0]
    head = shell.get_output_embeddings()
    for child, module in shell.named_children():
        if module is head:
            return child
    raise ValueError(f"{type(shell).__name__} declares no LM head (no _pp_plan, no output embeddings); "
                     "pipegrid.hf needs one to compute logits")


def _is_tied(shell: Any, embed: str) -> bool:
    """Whether transformers ties the head's weight to the embedding's, from the model's own tie map."""
    ties = dict(getattr(shell, "all_tied_weights_keys", None) or {})
    if not ties:
        return False
    head = f"{_head_name(shell)}.weight"
    source = f"{shell.base_model_prefix}.{embed}.weight"
    if ties != {head: source}:
        raise ValueError(f"{type(shell).__name__} ties {ties}; pipegrid.hf supports only the LM head tied to the "
                         f"input embedding ({head} -> {source})")
    head_params = [n for n, _ in getattr(shell, _head_name(shell)).named_parameters()]
    if head_params != ["weight"]:
        raise ValueError(f"{type(shell).__name__}: a tied LM head may hold only its weight, it has {head_params}")
    return True
