"""A transformers causal LM held on the meta device, of which each stage materialises only
the modules it owns, plus the glue transformers' own forward code computes between them.

The glue (attention masks for each layer type, rotary tables, position ids, embedding
scales, logit soft-capping) is not re-implemented: a stage runs the base model's own
``forward`` with its decoder layers swapped for recording stubs, and keeps the arguments
each layer would have been called with. The LM head runs the causal LM's own ``forward``
with the base model swapped for a stub returning the final hidden state. Whatever a
family does between its modules, the pipeline therefore does the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.conf.schema import CommConfig
from pipegrid.hf.pp_plan import StagePlan, causal_lm_class, resolve
from pipegrid.hf.tp_plan import ShardRule, TensorSplit, check_tensor_parallel
from pipegrid.tensor import (SequenceParallel, TensorParallelRNG, mark_sequence_parallel, scatter_to_sequence_region,
                             tensor_parallel_rank, tensor_parallel_size)
from pipegrid.topology.grid import Topology
from pipegrid.topology.groups import ProcessGroups
from pipegrid.topology.join import init_distributed

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's arguments besides its hidden state


class WeightSource(Protocol):
    """Fills a freshly materialised module: from a checkpoint, or with transformers' random init."""

    reads_whole: bool
    """True when the source draws whole tensors (random init): a split module is then cut from the
    whole one, so every tensor degree starts from the same weights; False reads only the shard."""

    def fill(self, skeleton: Skeleton, module: nn.Module, name: str) -> None: ...


class _Captured(Exception):
    """Raised by the last layer stub: the base model's forward has nothing more to tell."""


class _LayerStub(nn.Module):
    """Stands in for decoder layer ``index`` while the base model's forward runs: records its call."""

    def __init__(self, index: int, last: int, record: dict[int, tuple], layer: nn.Module) -> None:
        super().__init__()
        self.index, self.last, self.record = index, last, record
        for name, value in vars(layer).items():  # attributes the forward may read (attention_type, ...)
            if not name.startswith("_") and name != "training" and not isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record[self.index] = (args, kwargs)
        if self.index == self.last:
            raise _Captured
        return args[0] if args else kwargs["hidden_states"]


class _Unowned(nn.Module):
    """Stands in for a prefix module another stage owns while the base model's forward runs: the
    recorded layer calls depend on shapes, not on its values. A position table gives zeros of its
    width; anything else hands its input through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.width = module.embedding_dim if isinstance(module, nn.Embedding) else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.width is None:
            return x
        return torch.zeros(*x.shape, self.width, device=x.device)


class _HiddenOnly:
    """What the base-model stub returns: the final hidden state, every other field None."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getattr__(self, name: str) -> None:
        return None

    def __getitem__(self, index: Any) -> Any:
        return (self.last_hidden_state,)[index]


class _BaseStub(nn.Module):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> _HiddenOnly:
        return _HiddenOnly(self.hidden)


def _check_group(tensor: int, group: Any) -> None:
    size = tensor_parallel_size(group)
    if size != tensor:
        raise ValueError(f"topology.tensor={tensor} needs its tensor-parallel group, got one of {size} ranks; leave "
                         "tensor_group out (pipegrid builds the groups from the topology) or pass "
                         "tensor_group=groups.tensor_parallel_group with groups = pg.init_distributed(config)")


def own_groups(topology: Topology) -> ProcessGroups:
    """pipegrid's process groups for ``topology``, built when the caller passed no tensor group:
    torch.distributed is joined from the environment (torchrun's variables) if it is not up yet.
    Collective: every rank builds its model in the same order, as it must anyway."""
    if not dist.is_initialized() and ("WORLD_SIZE" not in os.environ or "RANK" not in os.environ):
        raise RuntimeError(f"topology.tensor={topology.tensor} splits the model over a tensor group, but "
                           "torch.distributed is not initialised and RANK/WORLD_SIZE are not set; start the job with "
                           f"torchrun --nproc-per-node {topology.world_size} ... (or pipegrid.launch.run_local), or "
                           "pass tensor_group=groups.tensor_parallel_group with groups = pg.init_distributed(config)")
    if dist.is_initialized():  # joined by the caller, as it chose (cores, backend): only the groups are new
        return ProcessGroups(topology, timeout_s=CommConfig().timeout_s)
    return init_distributed({"topology": {"pipe": topology.pipe, "data": topology.data, "tensor": topology.tensor}})


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in the order transformers' ``smart_apply`` initialises them."""
    for child in module.children():
        yield from _children_first(child)
    yield module


class Skeleton:
    """The causal LM built on the meta device (no storage), its plan, and the glue between stages."""

    def __init__(self, config: Any, plan: dict, source: WeightSource, dtype: torch.dtype,
                 attn_implementation: str | None = None, topology: Topology | None = None,
                 tensor_group: Any = None, sequence_parallel: bool = False) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        causal_lm_class(config)  # refuses a config that is no causal LM, naming it
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with torch.device("meta"), no_init_weights():  # shapes only: initialising meta tensors is wasted time
            self.shell = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        self.config = self.shell.config
        self.dtype = dtype
        self.plan: StagePlan = resolve(self.shell, plan)
        self.base: nn.Module = getattr(self.shell, self.plan.base_prefix)
        self.source = source
        self.full_shapes = {key: tuple(t.shape) for key, t in self.shell.state_dict().items()}
        # whole parameter sizes, counted before any module is split (what partitioning and describe() see)
        self.parameter_sizes = {key: p.numel() for key, p in self.shell.named_parameters()}
        self.split: TensorSplit | None = None
        self.process_groups: ProcessGroups | None = None  # built here when the caller passed no tensor group
        tensor = 1 if topology is None else topology.tensor
        if sequence_parallel and tensor < 2:
            raise ValueError(f"{self.plan.class_name}: sequence_parallel=True splits the sequence over the tensor "
                             f"group, but topology.tensor={tensor}; pass a topology with tensor >= 2 or "
                             "sequence_parallel=False")
        self.sequence_parallel = SequenceParallel(sequence_parallel)
        """The switch the split layers consult: on in training and evaluation, off while generating."""
        self.tensor_rng = TensorParallelRNG()
        """Split attention's (and, sequence-parallel, whole decoder layers') dropout stream; seeded by the model."""
        if tensor > 1:
            tp_plan = check_tensor_parallel(self.config, self.shell, self.plan, tensor)  # before any group
            if tensor_group is None:
                self.process_groups = own_groups(topology)
                tensor_group = self.process_groups.tensor_parallel_group
            _check_group(tensor, tensor_group)
            self.tensor_rng = TensorParallelRNG(tensor_group)
            self.split = TensorSplit(self.shell, self.plan, tp_plan, tensor_group, tensor_parallel_rank(tensor_group),
                                     tensor, self.sequence_parallel, self.tensor_rng)
        self._record: dict[int, tuple] = {}
        layers = self.decoder_layers()
        self._stubs = nn.ModuleList([_LayerStub(i, len(layers) - 1, self._record, layer)
                                     for i, layer in enumerate(layers)])
        self._cache: tuple[tuple, list[LayerCall]] | None = None
        # modules outside the plan hold only buffers (checked by resolve): every stage needs them
        self.unplanned = [module for name, module in self.base.named_children()
                          if name not in (self.plan.embed, *self.plan.prefix, self.plan.layers, self.plan.norm)]

    def materialise_unplanned(self) -> None:
        """Give every stage the buffer-only modules outside the plan (rotary tables), computed afresh."""
        for module in self.unplanned:
            self.materialise_module(module, self.qualified_name(module))

    # ---- naming and materialising -------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return getattr(self.base, self.plan.layers)

    def base_name(self, child: str) -> str:
        """The qualified name of a base-model child, e.g. ``model.layers.3``."""
        return f"{self.plan.base_prefix}.{child}"

    def qualified_name(self, module: nn.Module) -> str:
        return next(name for name, m in self.shell.named_modules() if m is module)

    def materialise(self, name: str) -> nn.Module:
        """The module at qualified ``name``, given storage and filled by the weight source (once)."""
        module = self.shell.get_submodule(name)
        return self.materialise_module(module, name)

    def materialise_module(self, module: nn.Module, name: str) -> nn.Module:
        """``module`` given storage and filled; under tensor parallelism its split version (which
        replaces it in the skeleton when the module itself is split, as the embedding is)."""
        if not _on_meta(module):
            return module
        if self.split is None:
            module.to_empty(device="cpu")
            self.source.fill(self, module, name)
            return module
        return self._materialise_split(module, name)

    def _materialise_split(self, module: nn.Module, name: str) -> nn.Module:
        if self.source.reads_whole:  # random init: draw the whole tensors, keep this rank's slices
            module.to_empty(device="cpu")
            self.source.fill(self, module, name)
        swaps = self.split.split(module, name)
        top = next((parallel for full, _, parallel in swaps if full == name), module)
        if not self.source.reads_whole:  # a checkpoint: read only this rank's slices
            top.to_empty(device="cpu")
            self.source.fill(self, top, name)
            self.split.mark_shards(top)
            return top
        with torch.no_grad():
            for full, dense, parallel in swaps:
                parallel.to_empty(device="cpu")
                whole = dense.state_dict()
                for local, tensor in parallel.state_dict(keep_vars=True).items():
                    rule = self.shard_rule(f"{full}.{local}")
                    tensor.copy_(whole[local] if rule is None else rule.take(whole[local], self.split.rank,
                                                                              self.split.parts))
        self.split.mark_shards(top)
        return top

    def mark_sequence_parallel(self, module: nn.Module) -> None:
        """Under sequence parallelism, mark ``module``'s replicated parameters (a decoder layer's norms
        and row biases, the final norm): they see only this rank's tokens, their gradients are summed."""
        if self.sequence_parallel:
            mark_sequence_parallel(module)

    def scatter_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state after the embedding prefix: this tensor rank's chunk of the sequence under
        sequence parallelism (backward: all-gathered), else as it is."""
        if not self.sequence_parallel:
            return hidden
        return scatter_to_sequence_region(hidden, self.split.group)

    def shard_rule(self, key: str) -> ShardRule | None:
        """How the checkpoint tensor ``key`` is split over the tensor group (None: held whole)."""
        return None if self.split is None else self.split.rules.get(key)

    def tie_head(self, embedding: nn.Module) -> None:
        """Give the (tied) LM head the embedding's weight, as transformers' ``tie_weights`` does;
        split, the head holds the embedding's vocab shard, so the tie holds shard for shard."""
        if self.split is not None:
            self.split.tied_head(embedding)
            return
        getattr(self.shell, self.plan.head).weight = embedding.weight

    def tied_head_key(self) -> str | None:
        return f"{self.plan.head}.weight" if self.plan.tied else None

    def expected_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(key, shape) of every tensor a checkpoint of this model stores (a tied head's weight is not)."""
        tied = self.tied_head_key()
        return [(key, tuple(t.shape)) for key, t in self.shell.state_dict().items() if key != tied]

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> None:
        """transformers' own initialisation of ``module``'s tensors not flagged as loaded."""
        from transformers import initialization

        with initialization.guard_torch_init_functions():
            for sub in _children_first(module):
                self.shell._init_weights(sub)

    # ---- glue between stages ----------------------------------------------------------
    def first_hidden(self, embeds: torch.Tensor, mask: torch.Tensor | None, training: bool) -> torch.Tensor:
        """The hidden state decoder layer 0 receives, computed from ``embeds`` by the model's forward."""
        return self._capture(embeds, mask, training)

    def layer_call(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                   training: bool) -> LayerCall:
        """Decoder layer ``index``'s other arguments for a micro-batch of ``hidden``'s shape and ``mask``.

        Computed once per micro-batch and stage (the first layer asks, the next ones reuse):
        the arguments depend only on the shape, dtype, device and padding mask.
        """
        if self.sequence_parallel:  # a chunk of the sequence: the glue is computed for all of it
            b, t, h = hidden.shape
            hidden = hidden.new_zeros(()).expand(b, t * self.split.parts, h)
        if self._cache is None or not self._same_key(self._cache[0], hidden, mask, training):
            with torch.no_grad():
                self._capture(hidden.detach(), mask, training)
        assert self._cache is not None
        return self._cache[1][index]

    @staticmethod
    def _key(hidden: torch.Tensor, mask: torch.Tensor | None, training: bool) -> tuple:
        return (mask, tuple(hidden.shape), hidden.dtype, hidden.device, training)

    def _same_key(self, key: tuple, hidden: torch.Tensor, mask: torch.Tensor | None, training: bool) -> bool:
        other = self._key(hidden, mask, training)
        return key[0] is other[0] and key[1:] == other[1:]

    # ---- the same glue with a KV cache (engine.generate) ---------------------------------
    def first_hidden_cached(self, embeds: torch.Tensor, step: Any, cache: Any) -> torch.Tensor:
        """``first_hidden`` for new tokens at ``step.positions`` after what ``cache`` holds."""
        with torch.no_grad():
            return self._capture(embeds, None, False, step=step, cache=cache)

    def cached_layer_call(self, index: int, hidden: torch.Tensor, step: Any, cache: Any) -> LayerCall:
        """``layer_call`` with a cache: the arguments (mask over cached + new tokens, rotary
        tables at the new positions, the cache itself) for this step, captured once per stage."""
        if self._cache is None or not self._same_key(self._cache[0], hidden, step, False):  # the step's identity
            with torch.no_grad():
                self._capture(hidden.detach(), None, False, step=step, cache=cache)
        assert self._cache is not None
        return self._cache[1][index]

    def _capture(self, embeds: torch.Tensor, mask: torch.Tensor | None, training: bool,
                 step: Any = None, cache: Any = None) -> torch.Tensor:
        """Run the base model's forward on ``embeds`` with recording stubs; cache each layer's call.

        With a generation ``step`` the forward gets its positions, its padding mask (None
        when nothing is padded, as transformers' generate drops an all-ones mask) and the
        stage's ``cache``, which the recorded calls then carry to the real layers."""
        for module in self.unplanned:  # rotary tables follow the activations' device
            if any(b.device != embeds.device for b in module.buffers()):
                module.to(embeds.device)
        swaps: dict[str, nn.Module] = {self.plan.layers: self._stubs}
        for name in self.plan.prefix:
            module = getattr(self.base, name)
            if _on_meta(module):
                swaps[name] = _Unowned(module)
        saved = {name: self.base._modules[name] for name in swaps}
        was_training = self.base.training
        self._record.clear()
        self.base._modules.update(swaps)
        self.base.training = training
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if step is not None:
            kwargs = {"attention_mask": step.attention_mask if step.padded else None, "use_cache": True,
                      "position_ids": step.positions, self._cache_keyword(): cache}
        try:
            self.base(inputs_embeds=embeds, **kwargs)
        except _Captured:
            pass
        finally:
            self.base._modules.update(saved)
            self.base.training = was_training
        return self._keep_calls(embeds, step if step is not None else mask, training)

    def _cache_keyword(self) -> str:
        """transformers 5 calls the cache argument ``cache``; earlier releases ``past_key_values``."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"

    def _keep_calls(self, embeds: torch.Tensor, mask: torch.Tensor | None, training: bool) -> torch.Tensor:
        count = len(self._stubs)
        if len(self._record) != count:
            raise RuntimeError(f"{self.plan.class_name}: its base model's forward called {len(self._record)} of "
                               f"its {count} decoder layers in order; pipegrid.hf cannot pipeline a forward that "
                               "skips or repeats layers")
        calls, first = [], None
        for index in range(count):
            args, kwargs = self._record[index]
            if args:
                hidden, call = args[0], (args[1:], kwargs)
            else:
                kwargs = dict(kwargs)
                hidden, call = kwargs.pop("hidden_states"), ((), kwargs)
            first = hidden if index == 0 else first
            calls.append(call)
        self._record.clear()
        self._cache = (self._key(embeds, mask, training), calls)
        return first

    def logits(self, hidden: torch.Tensor, training: bool) -> torch.Tensor:
        """The causal LM's own forward from the final (normed) hidden state: head, scaling, soft-cap."""
        prefix = self.plan.base_prefix
        saved, was_training = self.shell._modules[prefix], self.shell.training
        self.shell._modules[prefix] = _BaseStub(hidden)
        self.shell.training = training
        try:
            output = self.shell()
        finally:
            self.shell._modules[prefix] = saved
            self.shell.training = was_training
        return output.logits if hasattr(output, "logits") else output[0]
