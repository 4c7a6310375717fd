"""The pipeline layers of a transformers causal LM, each wrapping the model's own modules:

    Embedding -> EmbeddingPrefix -> DecoderLayer x L -> FinalNorm -> LMHead (or Embedding.logits, tied)

A layer takes and returns ``hidden`` or ``(hidden, attention_mask)``: the 2-D padding
mask rides along between stages (an integer tensor, so it gets no gradient) and each
stage turns it into the per-layer masks itself. Every layer builds by materialising its
modules of the meta-device skeleton, so a stage allocates only what it owns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipegrid.hf.skeleton import Skeleton
from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec

TIED_KEY = "embed"


def split(x: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``hidden`` or ``(hidden, attention_mask)`` -> (hidden, mask or None)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{where} takes a tensor or a pair (tensor, attention_mask), got {len(x)} values")
        return x[0], x[1]
    return x, None


def join(hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    return hidden if mask is None else (hidden, mask)


class _Part(nn.Module):
    """A pipeline layer made of skeleton modules; ``hf_names`` maps its attributes to their
    names in the transformers model (``layer`` -> ``model.layers.3``)."""

    def __init__(self, skeleton: Skeleton) -> None:
        super().__init__()
        self.skeleton = skeleton  # a plain object: not registered, never moved or saved with the layer
        self.hf_names: dict[str, str] = {}

    def adopt(self, attr: str, name: str) -> nn.Module:
        module = self.skeleton.materialise(name)
        self.add_module(attr, module)
        self.hf_names[attr] = name
        return module

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name in the transformers checkpoint, tensor) of every tensor this layer stores."""
        for attr, name in self.hf_names.items():
            for local, tensor in self.get_submodule(attr).state_dict().items():
                yield f"{name}.{local}", tensor


class Embedding(_Part):
    """input_ids [, attention_mask] -> inputs_embeds [, mask]; with tied weights also the LM head."""

    def __init__(self, skeleton: Skeleton) -> None:
        super().__init__(skeleton)
        embed = self.adopt("embed", skeleton.base_name(skeleton.plan.embed))
        if skeleton.plan.tied:
            skeleton.tie_head(embed)

    def forward(self, x: Any) -> Any:
        ids, mask = split(x, "the first stage")
        if ids.is_floating_point():
            raise TypeError(f"the first stage takes input_ids or (input_ids, attention_mask) as integer tensors, "
                            f"got {ids.dtype} input_ids; tokenize the text first")
        return join(self.embed(ids), mask)

    def forward_cached(self, ids: torch.Tensor, cache: Any, step: Any) -> torch.Tensor:
        """Generation: the new tokens' embeddings (the mask travels in ``step``)."""
        return self.embed(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head's position: the causal LM's own logits from the final hidden state."""
        return self.skeleton.logits(hidden, self.training)


class EmbeddingPrefix(_Part):
    """inputs_embeds -> the hidden state decoder layer 0 receives (positions, scaling, dropout)."""

    def __init__(self, skeleton: Skeleton) -> None:
        super().__init__(skeleton)
        self.parts = nn.ModuleDict()
        for child in skeleton.plan.prefix:
            self.parts[child] = skeleton.materialise(skeleton.base_name(child))
            self.hf_names[f"parts.{child}"] = skeleton.base_name(child)

    def forward(self, x: Any) -> Any:
        embeds, mask = split(x, "EmbeddingPrefix")
        hidden = self.skeleton.first_hidden(embeds, mask, self.training)  # (B, T, H): positions on every token
        return join(self.skeleton.scatter_sequence(hidden), mask)  # sequence-parallel: (B, T / tensor, H)

    def forward_cached(self, embeds: torch.Tensor, cache: Any, step: Any) -> torch.Tensor:
        return self.skeleton.first_hidden_cached(embeds, step, cache)


class DecoderLayer(_Part):
    """One of the model's decoder layers, called as the model's forward would call it."""

    def __init__(self, skeleton: Skeleton, index: int) -> None:
        super().__init__(skeleton)
        self.index = index
        skeleton.mark_sequence_parallel(self.adopt("layer", f"{skeleton.base_name(skeleton.plan.layers)}.{index}"))
        self.tensor_parallel_rng = skeleton.tensor_rng  # split attention's stream; checkpointing finds it here

    def compile_targets(self) -> list[nn.Module]:
        """``compile.enabled``: the transformers layer, compiled once for every index (dynamo guards
        on an int attribute such as ``self.index``, so compiling this wrapper would compile each
        layer again, and past ``recompile_limit`` layers would run eagerly); the glue stays eager."""
        return [self.layer]

    def forward(self, x: Any) -> Any:
        hidden, mask = split(x, f"decoder layer {self.index}")
        args, kwargs = self.skeleton.layer_call(self.index, hidden, mask, self.training)
        if self.training and self.skeleton.sequence_parallel:
            # every activation in the layer is this rank's chunk or its heads: all its masks are its own
            out = self.tensor_parallel_rng.run(self.layer, hidden, *args, **kwargs)
        else:
            out = self.layer(hidden, *args, **kwargs)
        return join(out[0] if isinstance(out, tuple) else out, mask)

    def forward_cached(self, hidden: torch.Tensor, cache: Any, step: Any) -> torch.Tensor:
        """Generation: the layer as the model's forward calls it with a cache (``hf/kv_cache.py``)."""
        args, kwargs = self.skeleton.cached_layer_call(self.index, hidden, step, cache)
        out = self.layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class FinalNorm(_Part):
    """The norm after the last decoder layer; the padding mask stops here."""

    def __init__(self, skeleton: Skeleton) -> None:
        super().__init__(skeleton)
        skeleton.mark_sequence_parallel(self.adopt("norm", skeleton.base_name(skeleton.plan.norm)))

    def forward(self, x: Any) -> torch.Tensor:
        hidden, _ = split(x, "the final norm")
        return self.norm(hidden)

    def forward_cached(self, hidden: torch.Tensor, cache: Any, step: Any) -> torch.Tensor:
        return self.norm(hidden)


class LMHead(_Part):
    """An untied LM head: the causal LM's own logits from the final hidden state (or, with a
    fused loss, what the loss needs to make them itself: ``head``, a :class:`FusableHead`)."""

    def __init__(self, skeleton: Skeleton, head: Callable[[torch.Tensor, bool], Any] | None = None) -> None:
        super().__init__(skeleton)
        self.adopt("head", skeleton.plan.head)
        self.fusable_head = head

    def forward(self, hidden: torch.Tensor) -> Any:
        if self.fusable_head is not None:
            return self.fusable_head(hidden, self.training)
        return self.skeleton.logits(hidden, self.training)

    def forward_cached(self, hidden: torch.Tensor, cache: Any, step: Any) -> torch.Tensor:
        return self.skeleton.logits(hidden, False)


class _Described:
    """A spec that names its layer by the transformers class and counts parameters on the skeleton."""

    hf_modules: tuple[str, ...]
    _label: str
    _skeleton: Skeleton

    @property
    def class_name(self) -> str:
        return self._label

    def num_parameters(self) -> int:
        """Counted on the meta-device skeleton (whole, even once this rank's copy is split): nothing
        is built or read."""
        sizes = self._skeleton.parameter_sizes
        keys = {key for name in self.hf_modules for key in sizes if key.startswith(f"{name}.")}
        return sum(sizes[key] for key in keys)


class HFLayerSpec(_Described, LayerSpec):
    """A layer of the causal LM, built by materialising ``hf_modules`` of the skeleton."""

    def __init__(self, cls: type, skeleton: Skeleton, *args: Any, label: str, hf_modules: tuple[str, ...]) -> None:
        super().__init__(cls, skeleton, *args)
        self._skeleton, self._label, self.hf_modules = skeleton, label, hf_modules


class HFTiedLayerSpec(_Described, TiedLayerSpec):
    """The embedding (and, tied, the LM head's position): one module shared by first and last stage."""

    def __init__(self, skeleton: Skeleton, *, label: str, forward_fn: Any = None) -> None:
        super().__init__(TIED_KEY, Embedding, skeleton, forward_fn=forward_fn, tied_weight_attr="embed.weight")
        self._skeleton, self._label = skeleton, label
        self.hf_modules = (skeleton.base_name(skeleton.plan.embed),)


def _tied_head(head: Callable[[torch.Tensor, bool], Any], embedding: Embedding, hidden: torch.Tensor) -> Any:
    """The tied LM head's position with a fusable loss (``head``: a :class:`FusableHead`)."""
    return head(hidden, embedding.training)


def layer_specs(skeleton: Skeleton, head: Callable[[torch.Tensor, bool], Any] | None = None) -> list[LayerSpec]:
    """The causal LM as pipeline layers: embedding, prefix, decoder layers, final norm, head.

    ``head(hidden, training)``, when given, is what the head's position returns (logits, or the
    fused loss's inputs); None: the model's own logits."""
    plan = skeleton.plan
    embed_name = skeleton.base_name(plan.embed)
    embed_label = type(skeleton.shell.get_submodule(embed_name)).__name__
    if plan.tied:
        first: LayerSpec = HFTiedLayerSpec(skeleton, label=embed_label)
        tied = Embedding.logits if head is None else functools.partial(_tied_head, head)
        last: LayerSpec = HFTiedLayerSpec(skeleton, label="LMHead", forward_fn=tied)
    else:
        first = HFLayerSpec(Embedding, skeleton, label=embed_label, hf_modules=(embed_name,))
        last = HFLayerSpec(LMHead, skeleton, head, label="LMHead", hf_modules=(plan.head,))
    prefix = HFLayerSpec(EmbeddingPrefix, skeleton, label="EmbeddingPrefix",
                         hf_modules=tuple(skeleton.base_name(child) for child in plan.prefix))
    layers_name = skeleton.base_name(plan.layers)
    decoder = [HFLayerSpec(DecoderLayer, skeleton, i, label=type(layer).__name__, hf_modules=(f"{layers_name}.{i}",))
               for i, layer in enumerate(skeleton.decoder_layers())]
    norm_name = skeleton.base_name(plan.norm)
    norm = HFLayerSpec(FinalNorm, skeleton, label=type(skeleton.shell.get_submodule(norm_name)).__name__,
                       hf_modules=(norm_name,))
    return [first, prefix, *decoder, norm, last]
