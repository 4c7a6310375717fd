"""A GPT (nanoGPT's architecture) as a pipegrid PipelineModule, dense or tensor-parallel.

With no tensor group it is a plain dense GPT of ``nn`` layers; with one, attention
heads, the MLP and the vocabulary are split across the group (Megatron-LM's layout)
and it starts, and trains, exactly like the dense one. ``sequence_parallel`` also splits the
sequence between those regions (norms, residuals, pipeline messages: 1/tensor of the tokens).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipegrid.conf.schema import LossConfig
from pipegrid.pipe.module import PipelineModule
from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec
from pipegrid.tensor import (ColumnParallelLinear, LMHeadInputs, LMLoss, RowParallelLinear, SequenceParallel,
                             VocabParallelEmbedding, all_gather_sequence, copy_to_region, mark_sequence_parallel,
                             TensorParallelRNG, scatter_to_sequence_region, vocab_parallel_cross_entropy)

__all__ = ["GPT", "GPTConfig", "gpt_loss", "pad_vocab_size", "small_gpt_config", "tiny_gpt_config"]

Group = Any  # a torch.distributed ProcessGroup; None: dense
_INIT_STD = 0.02  # nanoGPT / GPT-2 initialisation


@dataclass
class GPTConfig:
    """The shape of a GPT."""

    vocab_size: int
    """Number of token ids (a multiple of the tensor degree when tensor-parallel)."""
    seq_len: int
    """Longest sequence (the number of learned positions)."""
    n_layer: int
    """Transformer blocks."""
    n_head: int
    """Attention heads per block (a multiple of the tensor degree when tensor-parallel)."""
    n_embd: int
    """Hidden size; a multiple of n_head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (0 for exact comparisons)."""
    sequence_parallel: bool = False
    """Between the tensor-parallel regions, each tensor rank holds seq_len / tensor of the tokens
    (Megatron's sequence parallelism); needs a tensor group, and sequences the tensor degree divides."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}; "
                             f"choose n_embd a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def check_tensor_parallel(self, tensor: int) -> None:
        """Raise ValueError unless heads, hidden size, MLP width and vocab split ``tensor`` ways."""
        sizes = {"n_head": self.n_head, "n_embd": self.n_embd, "vocab_size": self.vocab_size}
        bad = {name: size for name, size in sizes.items() if size % tensor}
        if bad:
            listed = ", ".join(f"{name}={size}" for name, size in bad.items())
            raise ValueError(f"tensor degree {tensor} must divide n_head, n_embd and vocab_size; not "
                             f"multiples of {tensor}: {listed}; pick a tensor degree that divides them "
                             f"(pad the vocabulary with pad_vocab_size)")

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameters of the whole model (the tied embedding once); nanoGPT leaves out the
        learned positions when ``non_embedding``."""
        c = self.n_embd
        block = 12 * c * c + 13 * c  # qkv, proj, 2-layer MLP (4x), 2 LayerNorms, biases
        total = self.vocab_size * c + self.n_layer * block + 2 * c
        return total if non_embedding else total + self.seq_len * c

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT's MFU estimate: 6N + 12 L C T."""
        return 6 * self.num_parameters() + 12 * self.n_layer * self.n_embd * self.seq_len


def tiny_gpt_config(**overrides: Any) -> GPTConfig:
    """~0.8M parameters, the default CPU run (pipegrid/conf/model/gpt_tiny.yaml)."""
    return GPTConfig(**{"vocab_size": 128, "seq_len": 64, "n_layer": 4, "n_head": 4, "n_embd": 128,
                        "dropout": 0.0, **overrides})


def small_gpt_config(**overrides: Any) -> GPTConfig:
    """~14M parameters, for GPUs (pipegrid/conf/model/gpt_small.yaml)."""
    return GPTConfig(**{"vocab_size": 128, "seq_len": 256, "n_layer": 8, "n_head": 8, "n_embd": 384,
                        "dropout": 0.1, **overrides})


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= ``vocab_size`` (Megatron pads the vocabulary
    so that it splits over the tensor group; the extra ids are never seen in data)."""
    return -(-vocab_size // multiple) * multiple


# ---- layers -----------------------------------------------------------------------

def _tensor_degree(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _dense_linear(in_features: int, out_features: int, std: float = _INIT_STD) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    nn.init.zeros_(linear.bias)
    return linear


def _column(in_features: int, out_features: int, group: Group, sequence_parallel: Any = False) -> nn.Module:
    # the dense layer is drawn either way, so dense and split models consume the RNG alike
    dense = _dense_linear(in_features, out_features)
    if group is None:
        return dense
    return ColumnParallelLinear(in_features, out_features, group=group, init_from=dense,
                                sequence_parallel=sequence_parallel)


def _row(in_features: int, out_features: int, group: Group, std: float, sequence_parallel: Any = False) -> nn.Module:
    dense = _dense_linear(in_features, out_features, std)
    if group is None:
        return dense
    return RowParallelLinear(in_features, out_features, group=group, init_from=dense,
                             sequence_parallel=sequence_parallel)


class TokenEmbedding(nn.Module):
    """Token ids to vectors; ``logits`` reuses the weight as the output head (tied)."""

    def __init__(self, vocab_size: int, n_embd: int, tensor_group: Group = None,
                 sequence_parallel: SequenceParallel | bool = False) -> None:
        super().__init__()
        self.tensor_group = tensor_group
        self.sequence_parallel = sequence_parallel
        dense = nn.Embedding(vocab_size, n_embd)
        nn.init.normal_(dense.weight, mean=0.0, std=_INIT_STD)
        self.tok = dense if tensor_group is None else \
            VocabParallelEmbedding(vocab_size, n_embd, group=tensor_group, init_from=dense)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)  # (B, T) -> (B, T, C)

    def forward_cached(self, ids: torch.Tensor, cache: dict, step: Any) -> torch.Tensor:
        return self(ids)  # stateless: engine.generate's cache protocol (pipegrid.CachedLayer)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied head: (B, T, C) -> (B, T, V / tensor), this rank's vocab slice."""
        return self._enter(h) @ self.tok.weight.T

    def _enter(self, h: torch.Tensor) -> torch.Tensor:
        """The head's input, whole on every tensor rank: (B, T / tensor, C) gathered under sequence
        parallelism (backward: the partial gradients reduce-scattered), else copied in."""
        if self.tensor_group is None:
            return h
        if self.sequence_parallel:
            return all_gather_sequence(h, self.tensor_group)  # (B, T, C)
        return copy_to_region(h, self.tensor_group)

    def head(self, h: torch.Tensor) -> LMHeadInputs | torch.Tensor:
        """The tied head for a fused loss: (B, T, C) and this rank's weight slice (V / tensor, C),
        from which the loss makes the logits a chunk of tokens at a time. Without autograd
        (evaluation, generation) the logits themselves, so ``eval_batch`` still returns them."""
        if not torch.is_grad_enabled():
            return self.logits(h)
        return LMHeadInputs(self._enter(h), self.tok.weight)


class PositionEmbedding(nn.Module):
    """Adds a learned position vector to each token vector; under sequence parallelism then keeps
    this tensor rank's chunk of the sequence (the blocks run on chunks from here on)."""

    def __init__(self, cfg: GPTConfig, tensor_group: Group = None,
                 sequence_parallel: SequenceParallel | bool = False) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.empty(cfg.seq_len, cfg.n_embd).normal_(0.0, _INIT_STD))
        self.drop = nn.Dropout(cfg.dropout)
        self.tensor_group, self.sequence_parallel = tensor_group, sequence_parallel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        h = self.drop(h + self.pos[:t])  # (B, T, C)
        if self.sequence_parallel:
            h = scatter_to_sequence_region(h, self.tensor_group)  # (B, T / tensor, C)
        return h

    def forward_cached(self, h: torch.Tensor, cache: dict, step: Any) -> torch.Tensor:
        """The new tokens at their own positions (left padding counted out)."""
        return self.drop(h + self.pos[step.positions])  # (B, T, C)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; with a tensor group each rank runs n_head / tensor heads.

    ``c_attn`` lays its output out per head as (head, [q, k, v], head_dim), Megatron's
    order, so a contiguous split of its rows gives each rank whole heads.
    """

    def __init__(self, cfg: GPTConfig, tensor_group: Group = None, sequence_parallel: Any = False,
                 rng: TensorParallelRNG | None = None) -> None:
        super().__init__()
        c = cfg.n_embd
        self.tensor_parallel_rng = rng if rng is not None else TensorParallelRNG()  # inactive: dense
        self.local_heads = cfg.n_head // _tensor_degree(tensor_group)
        self.head_dim = c // cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = _column(c, 3 * c, tensor_group, sequence_parallel)
        self.c_proj = _row(c, c, tensor_group, _INIT_STD / math.sqrt(2 * cfg.n_layer), sequence_parallel)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)  # (B, T, 3C / tensor): x may be a sequence chunk, the output has every token
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, self.local_heads, 3 * self.head_dim)  # (B, T, h, 3 hd)
        q, k, v = (z.transpose(1, 2) for z in qkv.split(self.head_dim, dim=-1))  # (B, h, T, hd)
        dropout = self.dropout if self.training else 0.0
        if dropout and self.tensor_parallel_rng.active:  # each rank its own heads, so its own masks
            y = self.tensor_parallel_rng.run(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                             dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)  # (B, T, C / tensor)
        return self.resid_drop(self.c_proj(y))  # (B, T, C), or (B, T / tensor, C) sequence-parallel

    def forward_cached(self, x: torch.Tensor, cache: dict, step: Any) -> torch.Tensor:
        """Attention of the new tokens over the cached keys/values and their own; ``cache``
        keeps k and v (B, h, past + T, hd) for the next step."""
        b, t, _ = x.shape
        qkv = self.c_attn(x).view(b, t, self.local_heads, 3 * self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in qkv.split(self.head_dim, dim=-1))  # (B, h, T, hd)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        past = k.shape[2] - t
        if past == 0 and not step.padded:  # the prefill of unpadded prompts: as in training
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(step.attention_mask, t))
        y = y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        return self.resid_drop(self.c_proj(y))


def _cached_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, T, S) bool: query i sees real keys up to its own place; each query also sees
    itself, so a padding query attends to something and stays finite."""
    s = attention_mask.shape[1]
    query = torch.arange(s - t, s, device=attention_mask.device)[:, None]  # (T, 1)
    key = torch.arange(s, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (key <= query) & attention_mask[:, None, :].bool()  # (B, T, S)
    return (allowed | (key == query))[:, None]


class MLP(nn.Module):
    """C -> 4C -> GELU -> C; with a tensor group the 4C hidden units are split."""

    def __init__(self, cfg: GPTConfig, tensor_group: Group = None, sequence_parallel: Any = False) -> None:
        super().__init__()
        c = cfg.n_embd
        self.c_fc = _column(c, 4 * c, tensor_group, sequence_parallel)
        self.c_proj = _row(4 * c, c, tensor_group, _INIT_STD / math.sqrt(2 * cfg.n_layer), sequence_parallel)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, 4C / tensor) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block; the LayerNorms are replicated on every tensor rank (under
    sequence parallelism each normalises its own tokens: marked, their gradients summed per step)."""

    def __init__(self, cfg: GPTConfig, tensor_group: Group = None, sequence_parallel: Any = False,
                 rng: TensorParallelRNG | None = None) -> None:
        super().__init__()
        self.sequence_parallel, self.dropout = sequence_parallel, cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, tensor_group, sequence_parallel, rng)
        self.tensor_parallel_rng = self.attn.tensor_parallel_rng
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg, tensor_group, sequence_parallel)
        if sequence_parallel:
            mark_sequence_parallel([*self.ln_1.parameters(), *self.ln_2.parameters()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rng = self.tensor_parallel_rng
        if self.sequence_parallel and self.training and self.dropout and rng.active:
            # every activation here is this rank's chunk or its heads: all its dropout masks are its own
            return rng.run(self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, cache: dict, step: Any) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), cache, step)
        return x + self.mlp(self.ln_2(x))


class FinalNorm(nn.LayerNorm):
    """The LayerNorm before the head (position-wise: generate runs it as is); marked under
    sequence parallelism, where each tensor rank normalises its own tokens."""

    def __init__(self, n_embd: int, sequence_parallel: Any = False) -> None:
        super().__init__(n_embd)
        if sequence_parallel:
            mark_sequence_parallel(self)


# ---- the loss and the model ---------------------------------------------------------

def gpt_loss(logits: torch.Tensor, labels: torch.Tensor, tensor_group: Group = None) -> torch.Tensor:
    """Mean token cross-entropy of logits (B, T, V) or, with a tensor group, of this
    rank's vocab slice (B, T, V / tensor), the full logits never gathered (``loss.chunked=false``;
    otherwise :class:`pipegrid.tensor.LMLoss` takes the head's inputs instead of its logits)."""
    if tensor_group is not None:
        return vocab_parallel_cross_entropy(logits, labels, tensor_group)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class GPT(PipelineModule):
    """nanoGPT's GPT as layers: tied token embedding, positions, ``n_layer`` blocks,
    final LayerNorm, tied head; inputs ids (B, T), labels (B, T), outputs logits.

    ``tensor_group``: the tensor-parallel group (``groups.tensor_parallel_group`` from
    ``pipegrid.init_distributed``), needed when ``topology.tensor > 1``; None builds the
    dense model. ``pipeline_kwargs`` go to PipelineModule (``virtual_stages``, ``seed``...).
    Dropout > 0 under tensor parallelism draws the replicated regions' masks from the default
    generator, which must be in the same state on every tensor rank, and core attention's (and,
    sequence-parallel, whole blocks') from ``self.tensor_parallel_rng``, seeded from ``seed``
    and the pipe and tensor rank (``pipegrid.tensor.random``).
    ``loss`` (default: the engine config's ``loss:`` section) chunks head + cross-entropy over
    the tokens unless ``loss.chunked`` is false; a ``loss_fn`` passed in keeps the head's logits.
    ``cfg.sequence_parallel``: ``self.sequence_parallel`` is the switch every layer consults;
    ``engine.generate`` turns it off (whole sequences: decode steps have one token) and, at
    tensor > 1, gathers the vocab-split logits over ``vocab_parallel_group``.
    """

    def __init__(self, cfg: GPTConfig, topology: Any = None, tensor_group: Group = None,
                 loss: LossConfig | None = None, **pipeline_kwargs: Any) -> None:
        tensor = topology.tensor if topology is not None else _tensor_degree(tensor_group)
        cfg.check_tensor_parallel(tensor)
        _check_sequence_parallel(cfg, tensor)
        _check_group(tensor, tensor_group)
        group = tensor_group if tensor > 1 else None
        sp = self.sequence_parallel = SequenceParallel(cfg.sequence_parallel)
        plain = gpt_loss if group is None else functools.partial(gpt_loss, tensor_group=group)
        lm_loss = LMLoss(loss, group, plain=plain)
        pipeline_kwargs.setdefault("loss_fn", lm_loss)
        head = functools.partial(_tied_head, pipeline_kwargs["loss_fn"])
        embed = (cfg.vocab_size, cfg.n_embd, group, sp)
        rng = self.tensor_parallel_rng = TensorParallelRNG(group)  # seeded below, once the pipe rank is known
        layers = [
            TiedLayerSpec("embed", TokenEmbedding, *embed, tied_weight_attr="tok.weight"),
            LayerSpec(PositionEmbedding, cfg, group, sp),
            *[LayerSpec(Block, cfg, group, sp, rng) for _ in range(cfg.n_layer)],
            LayerSpec(FinalNorm, cfg.n_embd, sp),
            TiedLayerSpec("embed", TokenEmbedding, *embed,
                          forward_fn=head,
                          tied_weight_attr="tok.weight"),
        ]
        super().__init__(layers, topology=topology, **pipeline_kwargs)
        rng.manual_seed(self.seed, self.pipe_rank)
        self.cfg = cfg
        self._vocab_group = group

    @property
    def vocab_parallel_group(self) -> Group:
        """The tensor group the head's logits are split over (the tied embedding is vocab-parallel
        whenever there is a tensor group), None when dense: ``engine.generate`` gathers them."""
        return self._vocab_group

    @property
    def max_positions(self) -> int:
        """Learned positions: ``engine.generate`` refuses prompt + new tokens beyond them."""
        return self.cfg.seq_len

    def num_flops_per_token(self) -> int:
        """Training FLOPs per token of the whole model (all stages and shards), for MFU."""
        return self.cfg.flops_per_token()

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOP/s over ``peak_flops`` (of all devices used)."""
        return self.num_flops_per_token() * tokens_per_second / peak_flops


def _tied_head(loss_fn: Any, embedding: TokenEmbedding, h: torch.Tensor) -> LMHeadInputs | torch.Tensor:
    """The last position: the head's inputs for a fusing :class:`LMLoss`, else the logits."""
    fuses = isinstance(loss_fn, LMLoss) and loss_fn.fuses()
    return embedding.head(h) if fuses else embedding.logits(h)


def _check_sequence_parallel(cfg: GPTConfig, tensor: int) -> None:
    if not cfg.sequence_parallel:
        return
    if tensor < 2:
        raise ValueError("GPTConfig.sequence_parallel=True splits the sequence over the tensor group, but "
                         f"topology.tensor={tensor}; set topology.tensor >= 2 or model.sequence_parallel=false")
    if cfg.seq_len % tensor:
        raise ValueError(f"GPTConfig.sequence_parallel=True splits seq_len={cfg.seq_len} over topology.tensor={tensor} "
                         f"ranks; choose seq_len a multiple of {tensor} or model.sequence_parallel=false")


def _check_group(tensor: int, tensor_group: Group) -> None:
    if tensor > 1 and tensor_group is None:
        raise ValueError(f"topology.tensor={tensor} needs the tensor-parallel group: pass "
                         f"tensor_group=groups.tensor_parallel_group (groups = pipegrid.init_distributed(cfg))")
    size = _tensor_degree(tensor_group)
    if tensor_group is not None and size != tensor:
        raise ValueError(f"tensor_group has {size} ranks but topology.tensor={tensor}; build both from "
                         f"the same config")
