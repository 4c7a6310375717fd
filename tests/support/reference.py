"""One-process references in plain torch, for the distributed tests to compare against.

Each model is built layer by layer, layer i under ``torch.manual_seed(seed + i)`` (the
initialisation pipegrid documents for global layer i; a tied module under the seed of
its first layer), and runs as a plain sequence. Training accumulates gradients over the
global batch, then calls ``torch.nn.utils.clip_grad_norm_`` and a ``torch.optim``
optimizer. The layers are the models' own ``nn.Module`` classes; no pipegrid code
(PipelineModule, build_reference, the engine) runs here, so a bug that the engine
shares with the code it is checked against cannot hide.

Parameters are named as ``tests.support.engine_cases.canonical_state`` names a pipeline's:
``layers.<global index>.<name>``, and ``tied_modules.<key>.<name>`` for tied weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tests.support.models import HIDDEN, Block, Embed, PositionAndMask, cross_entropy

SEED = 1234  # PipelineModule's default seed
Batch = tuple[Any, torch.Tensor]  # (inputs, labels)


def built(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``: how a layer starts, wherever a stage builds it."""
    torch.manual_seed(seed)
    return make()


class PlainTinyGPT(nn.Module):
    """``tests.support.models.gpt_layers(n_layer)`` as plain modules: Embed (tied) 0, PositionAndMask 1,
    Blocks 2..n+1, take_hidden n+2 (no parameters), LayerNorm n+3, the tied head n+4."""

    def __init__(self, n_layer: int = 3, seed: int = SEED) -> None:
        super().__init__()
        self.n_layer = n_layer
        self.tied_modules = nn.ModuleDict({"embed": built(seed, Embed)})
        layers = {"1": built(seed + 1, PositionAndMask)}
        layers.update({str(i): built(seed + i, Block) for i in range(2, n_layer + 2)})
        layers[str(n_layer + 3)] = built(seed + n_layer + 3, lambda: nn.LayerNorm(HIDDEN))
        self.layers = nn.ModuleDict(layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embed = self.tied_modules["embed"]
        h, mask = self.layers["1"](embed.tok(ids))  # (B, T, C), (T, T)
        for i in range(2, self.n_layer + 2):
            h, mask = self.layers[str(i)]((h, mask))
        h = self.layers[str(self.n_layer + 3)](h)
        return h @ embed.tok.weight.T  # (B, T, V)


class PlainGPT(nn.Module):
    """``examples.models.gpt.GPT`` dense, as plain modules from the example's own layer
    classes (built with no tensor group: nn.Linear, nn.Embedding, nn.LayerNorm)."""

    def __init__(self, cfg: Any, seed: int = SEED) -> None:
        from examples.models.gpt import Block as GPTBlock
        from examples.models.gpt import PositionEmbedding, TokenEmbedding

        super().__init__()
        self.n_layer = cfg.n_layer
        self.tied_modules = nn.ModuleDict({"embed": built(seed, lambda: TokenEmbedding(cfg.vocab_size, cfg.n_embd))})
        layers = {"1": built(seed + 1, lambda: PositionEmbedding(cfg))}
        layers.update({str(i): built(seed + i, lambda: GPTBlock(cfg)) for i in range(2, cfg.n_layer + 2)})
        layers[str(cfg.n_layer + 2)] = built(seed + cfg.n_layer + 2, lambda: nn.LayerNorm(cfg.n_embd))
        self.layers = nn.ModuleDict(layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.tied_modules["embed"].tok.weight
        h = self.layers["1"](nn.functional.embedding(ids, weight))  # (B, T, C)
        for i in range(2, self.n_layer + 3):
            h = self.layers[str(i)](h)
        return h @ weight.T  # (B, T, V)


def named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def build_optimizer(spec: dict[str, Any], params: Any) -> torch.optim.Optimizer:
    """``{"_target_": "torch.optim.Adam", "lr": ...}`` -> torch's optimizer (its default implementation)."""
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    module, _, name = spec["_target_"].rpartition(".")
    assert module == "torch.optim", f"the reference builds torch.optim optimizers, got {spec['_target_']}"
    return getattr(torch.optim, name)(params, **kwargs)


def train(model: nn.Module, steps: Sequence[Sequence[Batch]], optimizer: dict[str, Any], grad_clip: float = 0.0,
          loss_fn: Callable[..., torch.Tensor] = cross_entropy, dtype: torch.dtype = torch.float32) -> dict:
    """One optimizer step per entry of ``steps`` (the global batch's micro-batches, by
    gradient accumulation). Returns the mean micro-batch losses, the gradient norms
    before clipping, and the parameters after the last step."""
    model = model.to(dtype)
    opt = build_optimizer(optimizer, model.parameters())
    losses, norms = [], []
    for batches in steps:
        total = 0.0
        for inputs, labels in batches:
            inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
            loss = loss_fn(model(inputs), labels)
            (loss / len(batches)).backward()
            total += loss.item()
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(batches))
    return {"losses": losses, "norms": norms, "state": named_state(model)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch],
             loss_fn: Callable[..., torch.Tensor] = cross_entropy) -> tuple[float, list[torch.Tensor]]:
    """(mean micro-batch loss, every micro-batch's output), as ``eval_batch(return_outputs=True)``."""
    outputs = [model(inputs) for inputs, _ in batches]
    losses = [loss_fn(out, labels).item() for out, (_, labels) in zip(outputs, batches)]
    return sum(losses) / len(losses), outputs


def load_named(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` (canonical names) into ``model``'s parameters; every one must be given."""
    params = dict(model.named_parameters())
    assert set(state) == set(params), f"missing {set(params) - set(state)}, unexpected {set(state) - set(params)}"
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model
