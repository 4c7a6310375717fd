"""Tensor parallelism for a transformers causal LM, read from its config's ``base_model_tp_plan``
(or pipegrid's adapter plan for GPT-2) and applied with pipegrid.tensor's Megatron layers.

Every planned module is swapped, while still on the meta device, for its parallel layer:
``colwise`` -> ColumnParallelLinear (bias split), ``rowwise`` -> RowParallelLinear (bias whole,
added after the all-reduce), the token embedding -> VocabParallelEmbedding and the LM head ->
ColumnParallelLinear without gather (the loss is vocab-parallel: no rank holds full logits).
Each split tensor gets a :class:`ShardRule` saying which slices of the stored tensor are this
rank's, so a rank reads only those (``copy_slices``) and ``assemble`` puts shards back together.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipegrid.hf.attention_rng import route_attention
from pipegrid.hf.pp_plan import StagePlan
from pipegrid.tensor import (ColumnParallelLinear, RowParallelLinear, SequenceParallel, SharedInputCopy,
                             TensorParallelRNG, VocabParallelEmbedding, reduce_from_region)

# GPT-2 declares no base_model_tp_plan. Its c_attn is one Conv1D packing q, k and v: "colwise_qkv"
# splits each of the three parts by heads, so a rank's shard is [q_r, k_r, v_r] and GPT-2's own
# forward (split by split_size, reshape with -1 heads) runs unchanged on local heads.
ADAPTER_TP_PLANS: dict[str, dict[str, str]] = {
    "gpt2": {"h.*.attn.c_attn": "colwise_qkv", "h.*.attn.c_proj": "rowwise",
             "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
}
SUPPORTED_STYLES = ("colwise", "rowwise", "colwise_qkv", "packed_qkv", "packed_halves", "embedding_rowwise")  # the last: vocab rows, as we split
# Packed projections: one linear whose output concatenates parts (Phi-3's qkv_proj: q, k, v with
# GQA widths; gate_up_proj: gate, up). transformers 5 plans them "colwise_gather_output" (every rank
# gets the whole output back) and the projection after them "rowwise_split_input". Split instead per
# part, each part by heads (or evenly), the rank's slices concatenated: the family's own forward
# then cuts the local output at local widths, and the next projection's input is already split, so
# the pair is plain colwise/rowwise with no gather. A gathered output of anything else (OLMo2's
# q/k/v, normed over all heads) is still refused.
PACKED_PROJECTIONS = {"qkv_proj": "qkv", "gate_up_proj": "halves"}
_PACKED_STYLE, _AFTER_PACKED_STYLE = "colwise_gather_output", "rowwise_split_input"
# attention attributes that count heads (or their width) on this rank; head_dim and the
# query-per-key-head ratio stay as they are
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "split_size")


@dataclass(frozen=True)
class ShardRule:
    """Which part of a stored tensor a tensor rank holds: along ``dim``, each of the ``pieces``
    (sizes of packed parts, e.g. q, k, v) split evenly, the rank's slices concatenated; a
    ``transposed`` tensor is stored (in, out) as GPT-2's Conv1D and held (out, in) as nn.Linear."""

    dim: int
    pieces: tuple[int, ...]
    transposed: bool = False

    def slices(self, rank: int, parts: int) -> list[tuple[int, int]]:
        """(start, stop) along ``dim`` of the stored tensor, in the order they are concatenated."""
        out, offset = [], 0
        for size in self.pieces:
            width = size // parts
            out.append((offset + rank * width, offset + (rank + 1) * width))
            offset += size
        return out

    def from_slices(self, slices: list[torch.Tensor]) -> torch.Tensor:
        local = torch.cat(slices, dim=self.dim)
        return local.t() if self.transposed else local

    def take(self, full: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
        """This rank's shard of a whole tensor held in memory (random init)."""
        return self.from_slices([full.narrow(self.dim, a, b - a) for a, b in self.slices(rank, parts)])

    def copy_slices(self, target: torch.Tensor, read: Callable[[tuple[slice, ...]], torch.Tensor], rank: int,
                    parts: int, block_rows: int) -> None:
        """Fill ``target`` (this rank's shard) from the stored tensor, ``block_rows`` stored rows at a
        time: ``read`` indexes a safetensors ``get_slice``, which reads just that block from the file,
        so a rank never holds the whole tensor, nor a second copy of its shard."""
        held = target.t() if self.transposed else target  # the stored orientation
        offset = 0
        for start, stop in self.slices(rank, parts):
            dest = held.narrow(self.dim, offset, stop - start)
            offset += stop - start
            rows = dest.shape[0]
            for row in range(0, rows, block_rows):
                end = min(row + block_rows, rows)
                index = (slice(start + row, start + end),) if self.dim == 0 else (slice(row, end), slice(start, stop))
                dest[row:end].copy_(read(index))

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The stored tensor from every rank's shard (in tensor-rank order)."""
        parts = len(shards)
        held = [s.t() if self.transposed else s for s in shards]
        split = [torch.split(s, [size // parts for size in self.pieces], dim=self.dim) for s in held]
        return torch.cat([split[r][p] for p in range(len(self.pieces)) for r in range(parts)], dim=self.dim)


def tp_plan_for(config: Any, shell: nn.Module) -> dict[str, str]:
    """The base model's TP plan: the config's ``base_model_tp_plan``, else the adapter's; refused
    (before any process group) when neither exists or a style is one pipegrid does not apply."""
    plan = getattr(config, "base_model_tp_plan", None) or ADAPTER_TP_PLANS.get(config.model_type)
    if not plan:
        raise ValueError(f"{type(shell).__name__}: {type(config).__name__} has no base_model_tp_plan and "
                         f"pipegrid.hf has no adapter TP plan for model_type {config.model_type!r} (adapters: "
                         f"{sorted(ADAPTER_TP_PLANS)}); set topology.tensor=1 or add an entry to "
                         "pipegrid.hf.tp_plan.ADAPTER_TP_PLANS")
    plan = _with_packed_projections(plan)
    unsupported = {key: style for key, style in plan.items() if style not in SUPPORTED_STYLES}
    if unsupported:
        raise ValueError(f"{type(shell).__name__}'s TP plan uses styles pipegrid.hf does not apply: {unsupported} "
                         f"(it applies {list(SUPPORTED_STYLES)}, and {_PACKED_STYLE}/{_AFTER_PACKED_STYLE} on the "
                         f"packed projections {sorted(PACKED_PROJECTIONS)}; not split: {_PACKED_STYLE} of other "
                         "modules, MoE local_*/gather styles, replicated_with_grad_allreduce norms); set "
                         "topology.tensor=1 for this model")
    return plan


def _with_packed_projections(plan: Mapping[str, str]) -> dict[str, str]:
    """The plan with each packed projection's gathered style read as a split by parts ("packed_qkv",
    "packed_halves") and the split-input rowwise projection beside it as plain "rowwise"; other
    entries unchanged (an unsupported style stays, to be named)."""
    out = dict(plan)
    packed_parents = set()
    for key, style in plan.items():
        parent, _, leaf = key.rpartition(".")
        if style == _PACKED_STYLE and leaf in PACKED_PROJECTIONS:
            out[key] = f"packed_{PACKED_PROJECTIONS[leaf]}"
            packed_parents.add(parent)
    for key, style in plan.items():
        if style == _AFTER_PACKED_STYLE and key.rpartition(".")[0] in packed_parents:
            out[key] = "rowwise"
    return out


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\*", r"\d+") + "$")


def _linear_sizes(module: nn.Module) -> tuple[int, int, bool, bool] | None:
    """(in, out, has bias, stored transposed) of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None, False
    if type(module).__name__ == "Conv1D":  # weight (in, out): GPT-2's
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None, True
    return None


def check_tensor_parallel(config: Any, shell: nn.Module, plan: StagePlan, tensor: int) -> dict[str, str]:
    """Everything that must divide ``tensor``: heads, key/value heads, vocabulary, every planned
    linear's split width. Refused naming the fix, before any process group; the TP plan."""
    tp_plan = tp_plan_for(config, shell)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    where = f"{type(shell).__name__} at topology.tensor={tensor}"
    if heads is not None and heads % tensor:
        raise ValueError(f"{where}: num_attention_heads={heads} is not divisible by {tensor}; choose a tensor "
                         f"degree that divides {heads}")
    if kv_heads is not None and kv_heads % tensor:
        raise ValueError(f"{where}: num_key_value_heads={kv_heads} is not divisible by {tensor} (each tensor rank "
                         f"needs whole key/value heads); choose topology.tensor dividing {kv_heads}, or use "
                         "topology.data/pipe for the other processes")
    if config.vocab_size % tensor:
        raise ValueError(f"{where}: vocab_size={config.vocab_size} is not divisible by {tensor}; pad the vocabulary "
                         f"to a multiple of {tensor} (resize_token_embeddings) or choose another tensor degree")
    base = getattr(shell, plan.base_prefix)
    for name, module in base.named_modules():
        style = style_of(tp_plan, name) if name != plan.embed else None  # the embedding: vocab rows, always
        sizes = _linear_sizes(module) if style else None
        if style and sizes is None:
            raise ValueError(f"{where}: the TP plan splits {name} ({type(module).__name__}) {style}, but pipegrid.hf "
                             "splits only nn.Linear and Conv1D; set topology.tensor=1 for this model")
        widths = () if not sizes else (sizes[0],) if style == "rowwise" else packed_pieces(style, sizes[1], config)
        if any(width % tensor for width in widths):
            raise ValueError(f"{where}: {name} {style} has widths {list(widths)}, not all divisible by {tensor}; "
                             "choose a tensor degree that divides them")
    return tp_plan


def packed_pieces(style: str, out_features: int, config: Any) -> tuple[int, ...]:
    """The parts a column-split projection's output packs, each split over the tensor group
    on its own: q, k, v (GQA widths for "packed_qkv", equal thirds for GPT-2's "colwise_qkv"),
    gate and up ("packed_halves"), or one part."""
    if style == "colwise_qkv":
        return (out_features // 3,) * 3
    if style == "packed_halves":
        return (out_features // 2,) * 2
    if style == "packed_qkv":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = out_features // (heads + 2 * kv_heads)
        return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim
    return (out_features,)


def style_of(tp_plan: Mapping[str, str], name: str) -> str | None:
    """The plan's style for base-model module ``name`` (``layers.3.self_attn.q_proj``), or None."""
    for key, style in tp_plan.items():
        if _pattern(key).match(name):
            return style
    return None


def _meta_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(in_features, out_features, bias=bias)


class TensorSplit:
    """This rank's place in the tensor group and how the model's modules split over it."""

    def __init__(self, shell: nn.Module, plan: StagePlan, tp_plan: Mapping[str, str], group: Any,
                 rank: int, parts: int, sequence_parallel: SequenceParallel | None = None,
                 rng: TensorParallelRNG | None = None) -> None:
        self.shell, self.plan, self.tp_plan = shell, plan, dict(tp_plan)
        self.group, self.rank, self.parts = group, rank, parts
        self.sequence_parallel = sequence_parallel if sequence_parallel is not None else SequenceParallel(False)
        """The model's switch: column layers gather the sequence, row layers reduce-scatter it while on."""
        self.rng = rng
        """The tensor-parallel dropout stream split attention's core draws from (``hf/attention_rng.py``)."""
        self.rules: dict[str, ShardRule] = {}  # checkpoint key -> how it is split (absent: whole)

    def split(self, module: nn.Module, name: str) -> list[tuple[str, nn.Module, nn.Module]]:
        """Swap the planned modules in ``module`` (qualified ``name``; it may be one itself) for their
        parallel layers, on the meta device: (qualified name, dense, parallel) of each swap."""
        swaps = []
        for local, sub in list(module.named_modules()):
            full = f"{name}.{local}" if local else name
            parallel = self._parallel(full, sub)
            if parallel is not None:
                swaps.append((full, sub, parallel))
        for full, _, parallel in swaps:
            parent, _, attr = full.rpartition(".")
            setattr(self.shell.get_submodule(parent), attr, parallel)
        self._share_inputs(swaps)
        for sub in module.modules():
            _localise_heads(sub, self.parts)
            if self.rng is not None and getattr(sub, "_pipegrid_local_heads", False):
                route_attention(sub, self.rng)
        return swaps

    def _share_inputs(self, swaps: list[tuple[str, nn.Module, nn.Module]]) -> None:
        """Column-parallel siblings (q, k, v; gate, up) share one input copy per call of their
        parent: one backward all-reduce for them all instead of one each. Under sequence parallelism
        every such parent (one column or more) gathers its input as it is called: transformers'
        attention reads the sequence length off its input, so it must see the whole sequence."""
        by_parent: dict[str, list[ColumnParallelLinear]] = {}
        for full, _, parallel in swaps:
            if isinstance(parallel, ColumnParallelLinear) and full != self.plan.head:
                by_parent.setdefault(full.rpartition(".")[0], []).append(parallel)
        gather_at_parent = bool(self.sequence_parallel)
        for parent, columns in by_parent.items():
            if len(columns) < 2 and not gather_at_parent:
                continue
            shared = SharedInputCopy(self.group, self.sequence_parallel)
            shared.attach(self.shell.get_submodule(parent), enter_at_parent=gather_at_parent)
            for column in columns:
                column.input_copy = shared

    def _parallel(self, full: str, module: nn.Module) -> nn.Module | None:
        base = f"{self.plan.base_prefix}."
        if full == base + self.plan.embed:  # whatever the plan says (embedding_rowwise or nothing): vocab rows
            return self._embedding(full, module)
        if full == self.plan.head:
            return self._column(full, module, (module.weight.shape[0],))
        style = style_of(self.tp_plan, full[len(base):]) if full.startswith(base) else None
        if style is None:
            return None
        if style == "rowwise":
            return self._row(full, module)
        return self._column(full, module, packed_pieces(style, _linear_sizes(module)[1], self.shell.config))

    def _embedding(self, full: str, module: nn.Module) -> nn.Module:
        self.rules[f"{full}.weight"] = ShardRule(0, (module.num_embeddings,))
        if type(module) is not nn.Embedding:  # a family's own embedding (Gemma scales its output): keep its forward
            return _vocab_parallel_copy(module, self.group, self.rank, self.parts)
        with torch.device("meta"):
            return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, group=self.group,
                                          init_from=nn.Embedding(module.num_embeddings, module.embedding_dim))

    def _column(self, full: str, module: nn.Module, pieces: tuple[int, ...]) -> nn.Module:
        in_features, out_features, bias, transposed = _linear_sizes(module)
        self.rules[f"{full}.weight"] = ShardRule(1 if transposed else 0, pieces, transposed)
        if bias:
            self.rules[f"{full}.bias"] = ShardRule(0, pieces)
        with torch.device("meta"):
            return ColumnParallelLinear(in_features, out_features, bias=bias, group=self.group,
                                        init_from=_meta_linear(in_features, out_features, bias),
                                        sequence_parallel=self.sequence_parallel)

    def _row(self, full: str, module: nn.Module) -> nn.Module:
        in_features, out_features, bias, transposed = _linear_sizes(module)
        self.rules[f"{full}.weight"] = ShardRule(0 if transposed else 1, (in_features,), transposed)
        with torch.device("meta"):
            return RowParallelLinear(in_features, out_features, bias=bias, group=self.group,
                                     init_from=_meta_linear(in_features, out_features, bias),
                                     sequence_parallel=self.sequence_parallel)

    @staticmethod
    def mark_shards(module: nn.Module) -> None:
        """Mark split parameters as pipegrid.tensor does (``tensor_model_parallel``, ``partition_dim``):
        ``to_empty`` gives meta parameters new Parameter objects, without those marks."""
        for sub in module.modules():
            dims = {ColumnParallelLinear: {"weight": 0, "bias": 0}, RowParallelLinear: {"weight": 1},
                    VocabParallelEmbedding: {"weight": 0}}.get(type(sub), {})
            if getattr(sub, "_pipegrid_vocab_parallel", False):
                dims = {"weight": 0}
            for attr, dim in dims.items():
                param = getattr(sub, attr, None)
                if param is not None:
                    param.tensor_model_parallel = True
                    param.partition_dim = dim

    def tied_head(self, embedding: nn.Module) -> nn.Module:
        """The LM head sharing the vocab-parallel embedding's shard (same vocab slice per rank)."""
        head = self.shell.get_submodule(self.plan.head)
        if not isinstance(head, ColumnParallelLinear):
            head = self._column(self.plan.head, head, (head.weight.shape[0],))
            self.rules.pop(f"{self.plan.head}.weight")  # stored once, under the embedding's key
            setattr(self.shell, self.plan.head, head)
        head.weight = embedding.weight
        return head


def _localise_heads(module: nn.Module, parts: int) -> None:
    """An attention module holding parallel projections counts only this rank's heads."""
    if not any(isinstance(child, (ColumnParallelLinear, RowParallelLinear)) for child in module.children()):
        return
    if getattr(module, "_pipegrid_local_heads", False):
        return
    for attr in _HEAD_COUNTS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, attr, value // parts)
    config = getattr(module, "config", None)
    if isinstance(getattr(config, "num_attention_heads", None), int):
        # some forwards read head counts off the config (Phi-3's query width): a copy of their own
        module.config = local = copy.copy(config)
        for attr in ("num_attention_heads", "num_key_value_heads"):
            if isinstance(getattr(config, attr, None), int):
                setattr(local, attr, getattr(config, attr) // parts)
    module._pipegrid_local_heads = True


def _vocab_parallel_copy(module: nn.Embedding, group: Any, rank: int, parts: int) -> nn.Embedding:
    """A copy of an nn.Embedding subclass holding this rank's vocabulary rows (on meta), whose own
    forward (scaling and all) runs on the ids of its slice; other ids give zeros, and the all-reduce
    fills them in, as VocabParallelEmbedding does. The whole module stays untouched (random init
    cuts the shard from it)."""
    count = module.num_embeddings // parts
    start = rank * count
    local = copy.copy(module)
    local._parameters, local._buffers, local._modules = dict(module._parameters), dict(module._buffers), \
        dict(module._modules)
    local.weight = nn.Parameter(torch.empty(count, module.embedding_dim, dtype=module.weight.dtype, device="meta"))
    local.num_embeddings = count
    padding = module.padding_idx
    local.padding_idx = padding - start if padding is not None and start <= padding < start + count else None
    local.forward = functools.partial(_vocab_parallel_forward, type(module).forward.__get__(local), group, start,
                                      count)
    local._pipegrid_vocab_parallel = True
    return local


def _vocab_parallel_forward(forward: Callable[[torch.Tensor], torch.Tensor], group: Any, start: int, count: int,
                            ids: torch.Tensor) -> torch.Tensor:
    shifted = ids - start
    outside = (shifted < 0) | (shifted >= count)
    out = forward(shifted.masked_fill(outside, 0))  # (..., C)
    return reduce_from_region(out.masked_fill(outside.unsqueeze(-1), 0.0), group)
