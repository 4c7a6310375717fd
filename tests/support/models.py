"""Tiny deterministic models shared by the tests: a GPT-like stack with a tied
embedding/head and a tuple boundary, and a residual MLP stack, plus their data.

Both are lists of layers for ``PipelineModule`` (vocab 16, hidden 8 by default), so
any test can build a pipeline of them or a one-process reference with the same specs::

    layers = gpt_layers()
    stage = PipelineModule(layers, loss_fn=cross_entropy, pipe=2, pipe_rank=1)
    ref = build_reference(layers, loss_fn=cross_entropy)
    batches = gpt_batches(num_micro_batches=4)          # [(ids, labels), ...]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipegrid.pipe.module import PipelineModule
from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec

VOCAB = 16
HIDDEN = 8
SEQ_LEN = 6


class Embed(nn.Module):
    """Token embedding; ``logits`` reuses its weight as the output head (tied)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)  # (B, T) -> (B, T, C)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.tok.weight.T  # (B, T, C) -> (B, T, V)


class PositionAndMask(nn.Module):
    """Adds learned positions and starts the tuple boundary: returns (hidden, mask)."""

    def __init__(self, seq_len: int = SEQ_LEN, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(seq_len, hidden) * 0.1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = h.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()  # (T, T) causal
        return h + self.pos[:t], mask


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP; takes and returns (hidden, mask)."""

    def __init__(self, hidden: int = HIDDEN, n_head: int = 2) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, hidden))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, mask = inputs
        b, t, c = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.n_head)  # (B, H, T, T)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        h = h + self.proj(y)
        return h + self.mlp(self.ln2(h)), mask


def take_hidden(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A plain-function layer: drops the mask (module-level so it pickles)."""
    return inputs[0]


def gpt_layers(n_layer: int = 3, vocab: int = VOCAB, hidden: int = HIDDEN,
               seq_len: int = SEQ_LEN) -> list[Any]:
    """Embed[tied] -> PositionAndMask -> n_layer x Block -> take_hidden -> LayerNorm
    -> Embed.logits[tied]: ``n_layer + 5`` layers."""
    return [
        TiedLayerSpec("embed", Embed, vocab, hidden, tied_weight_attr="tok.weight"),
        LayerSpec(PositionAndMask, seq_len, hidden),
        *[LayerSpec(Block, hidden) for _ in range(n_layer)],
        take_hidden,
        LayerSpec(nn.LayerNorm, hidden),
        TiedLayerSpec("embed", Embed, vocab, hidden, forward_fn=Embed.logits,
                      tied_weight_attr="tok.weight"),
    ]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def gpt_batches(num_micro_batches: int = 4, micro_batch_size: int = 2, seq_len: int = SEQ_LEN,
                vocab: int = VOCAB, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (ids, next-token labels) micro-batches, int64 (B, T) each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_micro_batches):
        tokens = torch.randint(0, vocab, (micro_batch_size, seq_len + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


class TinyGPT(PipelineModule):
    """``gpt_layers`` as a PipelineModule subclass, the way users write models."""

    def __init__(self, n_layer: int = 3, **pipeline_kwargs: Any) -> None:
        pipeline_kwargs.setdefault("loss_fn", cross_entropy)
        super().__init__(gpt_layers(n_layer), **pipeline_kwargs)


class ResidualMLP(nn.Module):
    """x + W2 tanh(W1 LN(x))."""

    def __init__(self, width: int = HIDDEN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


def mlp_layers(depth: int = 4, width: int = HIDDEN, out: int = 1) -> list[Any]:
    """Linear in -> depth x ResidualMLP -> Linear out: ``depth + 2`` layers."""
    return [LayerSpec(nn.Linear, width, width),
            *[LayerSpec(ResidualMLP, width) for _ in range(depth)],
            LayerSpec(nn.Linear, width, out)]


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def mlp_batches(num_micro_batches: int = 4, micro_batch_size: int = 3, width: int = HIDDEN,
                out: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x, y) micro-batches: x (B, width), y (B, out)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro_batch_size, width, generator=gen, dtype=dtype),
             torch.randn(micro_batch_size, out, generator=gen, dtype=dtype))
            for _ in range(num_micro_batches)]
