"""PipelineModule: a model listed as layers, cut into stages, of which a process builds
only its own, each layer seeded from its global index so any layout starts identical."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.pipe.layer_costs import agreed, profile_layer_costs
from pipegrid.pipe.partition import owner_of, partition
from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec
from pipegrid.pipe.stage_chunk import Entry, StageChunk, seeded
from pipegrid.schedules.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from pipegrid.topology.grid import Topology

__all__ = ["PipelineModule", "StageChunk", "build_reference", "profile_layer_costs"]  # (the last two re-exported)

Layer = LayerSpec | nn.Module | Callable[..., Any]
_LAYOUT_ONLY = ("topology", "pipe", "pipe_rank", "virtual_stages", "stage_placement", "partition_method",
                "partition_costs", "profile_input")


def _class_name(layer: Layer) -> str:
    if isinstance(layer, LayerSpec):
        return layer.class_name
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def _num_parameters(layer: Layer) -> int:
    if isinstance(layer, LayerSpec):
        return layer.num_parameters()
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters())
    return 0


def _get_attr(module: nn.Module, path: str, key: str) -> nn.Parameter:
    value: Any = module
    for name in path.split("."):
        if not hasattr(value, name):
            params = ", ".join(n for n, _ in module.named_parameters()) or "none"
            raise ValueError(
                f"tied key {key!r}: {type(module).__name__} has no attribute path "
                f"{path!r}; its parameters are: {params}; set tied_weight_attr to one of them")
        value = getattr(value, name)
    if not isinstance(value, nn.Parameter):
        raise TypeError(f"tied key {key!r}: {path!r} must name an nn.Parameter, got "
                        f"{type(value).__name__}; point tied_weight_attr at a parameter")
    return value


def _check_layers(layers: Sequence[Layer]) -> tuple[Layer, ...]:
    layers = tuple(layers)
    if not layers:
        raise ValueError("PipelineModule needs at least one layer, got an empty list")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, (LayerSpec, nn.Module)) or callable(layer)):
            raise TypeError(f"layers[{i}] must be a LayerSpec, TiedLayerSpec, nn.Module or "
                            f"callable, got {type(layer).__name__}")
    first: dict[str, TiedLayerSpec] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec):
            head = first.setdefault(layer.key, layer)
            if head.cls is not layer.cls or head.tied_weight_attrs != layer.tied_weight_attrs:
                raise ValueError(
                    f"layers[{i}] reuses tied key {layer.key!r} with class "
                    f"{layer.class_name} / tied_weight_attr {layer.tied_weight_attrs}, but "
                    f"its first use has {head.class_name} / {head.tied_weight_attrs}; "
                    f"every layer of a key must share the class and tied_weight_attr")
    return layers


def _pipe_size(topology: Topology | None, pipe: int | None) -> int:
    if topology is not None:
        if pipe is not None and pipe != topology.pipe:
            raise ValueError(f"pipe={pipe} disagrees with topology.pipe="
                             f"{topology.pipe}; pass one of them, not both")
        return topology.pipe
    size = 1 if pipe is None else pipe
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"pipe must be an int >= 1 (the pipe ranks), got {pipe!r}")
    return size


def _own_pipe_rank(topology: Topology | None, pipe: int, pipe_rank: int | None) -> int:
    if pipe_rank is None:
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, before initialize()
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            return 0
        if topology is not None:
            return topology.pipe_rank(rank)
        if world % pipe:
            raise ValueError(f"cannot place {pipe} pipe ranks on {world} processes; pass "
                             f"topology=Topology(pipe=..., data=...) or pipe_rank=")
        return rank // (world // pipe)  # pipe is the slowest-varying axis
    if isinstance(pipe_rank, bool) or not isinstance(pipe_rank, int) or not 0 <= pipe_rank < pipe:
        raise ValueError(f"pipe_rank must be an int in [0, {pipe}), got {pipe_rank!r}")
    return pipe_rank


class PipelineModule(nn.Module):
    """A model given as a list of layers, of which this process builds only its stages.

    ``pipe`` pipe ranks (or ``topology.pipe``) hold ``virtual_stages`` chunks each; this
    process is pipe rank ``pipe_rank`` (default: from ``topology`` and the process's rank).
    Model stages number ``pipe * virtual_stages``; ``stage_placement`` says which
    pipe rank holds each (``self.placement``): ``"loop"`` gives rank r stages ``r, r + p,
    ...``, ``"v"`` (for zb_v and dualpipev, 2 chunks) stages ``r`` and ``2p-1-r``. This
    rank's are ``stage_ids``, each a ``StageChunk`` in ``self.stages``.
    Layer i is built under ``seed + i``; a tied key's module once per process under
    ``seed`` + its first index, so every layout starts bit-identical to
    ``build_reference``. ``self.parameters()`` yields every local parameter once.
    """

    def __init__(self, layers: Sequence[Layer], loss_fn: Callable[..., torch.Tensor] | None = None,
                 topology: Topology | None = None, pipe: int | None = None,
                 pipe_rank: int | None = None, partition_method: str | Sequence[float] = "parameters",
                 activation_checkpoint_interval: int = 0, seed: int = 1234,
                 virtual_stages: int = 1, partition_costs: Sequence[float] | None = None,
                 profile_input: Any = None, stage_placement: str = "loop") -> None:
        super().__init__()
        self.layer_specs = _check_layers(layers)
        self.num_layers = len(self.layer_specs)
        self.loss_fn = loss_fn
        self.topology = topology
        self.seed = seed
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval  # checked
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or \
                virtual_stages < 1:
            raise ValueError(f"virtual_stages must be an int >= 1, got {virtual_stages!r}")
        self.pipe = _pipe_size(topology, pipe)
        self.virtual_stages = virtual_stages
        self.placement = Placement(stage_placement, self.pipe, virtual_stages)  # refuses an unknown kind
        self.num_model_stages = self.placement.num_stages
        self.pipe_rank = _own_pipe_rank(topology, self.pipe, pipe_rank)
        self.stage_ids = self.placement.stages_of(self.pipe_rank)
        self.parts = self._partition(partition_method, partition_costs, profile_input)
        self._tied_first: dict[str, int] = {  # key -> index of its first layer
            layer.key: i for i, layer in reversed(list(enumerate(self.layer_specs)))
            if isinstance(layer, TiedLayerSpec)}
        self.tied_modules = nn.ModuleDict()
        self.stages = nn.ModuleDict(
            {str(s): StageChunk(s, self._build_stage(s), self._checkpoint_interval)
             for s in self.stage_ids})

    @property
    def activation_checkpoint_interval(self) -> int:
        """Recompute every k layers in backward (0: keep all activations); settable."""
        return self._checkpoint_interval

    @activation_checkpoint_interval.setter
    def activation_checkpoint_interval(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"activation_checkpoint_interval must be an int >= 0 (0 = off),"
                             f" got {every!r}")
        self._checkpoint_interval = every
        for chunk in getattr(self, "stages", {}).values():
            chunk.activation_checkpoint_interval = every

    def _partition(self, method: str | Sequence[float], costs: Sequence[float] | None,
                   profile_input: Any) -> list[int]:
        if costs is not None and not (isinstance(method, str) and
                                      method.lower() in ("balanced", "profile")):
            raise ValueError(f"partition_costs is only read with partition_method='balanced'"
                             f", got partition_method={method!r}; set it to 'balanced'")
        if isinstance(method, str) and method.lower() == "profile" and costs is None:
            if profile_input is None:
                raise ValueError("partition_method='profile' needs one example micro-batch:"
                                 " pass profile_input=<first stage input>, or partition_costs")
            costs = agreed(profile_layer_costs(self.layer_specs, profile_input, seed=self.seed))
        names = [_class_name(layer) for layer in self.layer_specs]
        counts = lambda: [_num_parameters(layer) for layer in self.layer_specs]  # noqa: E731
        return partition(method, self.num_model_stages, class_names=names,
                         param_counts=counts, costs=costs)

    def _build_stage(self, stage: int) -> list[Entry]:
        entries = []
        for i in range(self.parts[stage], self.parts[stage + 1]):
            layer = self.layer_specs[i]
            if isinstance(layer, TiedLayerSpec):
                module = self._tied_module(layer.key)
                call = functools.partial(layer.forward_fn, module) if layer.forward_fn \
                    else module
                entries.append(Entry(i, module, call))
            elif isinstance(layer, LayerSpec):
                with seeded(self.seed + i):
                    module = layer.build()
                entries.append(Entry(i, module, module))
            else:  # an nn.Module built by the caller, or a plain callable
                entries.append(Entry(i, layer, layer))
        return entries

    def _tied_module(self, key: str) -> nn.Module:
        if key not in self.tied_modules:
            first = self._tied_first[key]
            spec = self.layer_specs[first]
            with seeded(self.seed + first):
                module = spec.build()
            for path in spec.tied_weight_attrs:
                _get_attr(module, path, key)  # fail now, not when the engine syncs
            self.tied_modules[key] = module
        return self.tied_modules[key]

    # ---- running -------------------------------------------------------------------

    def _local_stage(self, stage: int | None) -> int:
        if stage is None:
            if len(self.stage_ids) > 1:
                raise RuntimeError(f"this process holds model stages {self.stage_ids} "
                                   f"(virtual_stages={self.virtual_stages}); pass stage=")
            return self.stage_ids[0]
        if stage not in self.stage_ids:
            raise ValueError(f"model stage {stage} is not held by pipe rank {self.pipe_rank}, "
                             f"which holds {self.stage_ids}; pass one of those")
        return stage

    def forward(self, x: Any, stage: int | None = None) -> Any:
        """Run the layers of model stage ``stage`` (default: the only local one)."""
        return self.stages[str(self._local_stage(stage))](x)

    def stage_module(self, stage: int | None = None) -> StageChunk:
        """The local chunk of a model stage; its parameters include its tied modules."""
        return self.stages[str(self._local_stage(stage))]

    def local_layers(self, stage: int | None = None) -> list[tuple[int, Any]]:
        """``(global_index, module_or_callable)`` for a local stage; a tied position
        gives the shared module (the same object at every position of its key)."""
        return [(e.index, e.layer) for e in self.stage_module(stage)._entries]

    def is_first_stage(self, stage: int | None = None) -> bool:
        return self._checked_stage(stage) == 0

    def is_last_stage(self, stage: int | None = None) -> bool:
        return self._checked_stage(stage) == self.num_model_stages - 1

    def _checked_stage(self, stage: int | None) -> int:
        if stage is None:
            return self._local_stage(None)
        if not 0 <= stage < self.num_model_stages:
            raise ValueError(f"model stage must be in [0, {self.num_model_stages}), got {stage}")
        return stage

    def layer_owner(self, index: int) -> int:
        """The model stage holding global layer ``index``."""
        return owner_of(self.parts, index)

    def pipe_rank_of(self, stage: int) -> int:
        """The pipe rank holding model stage ``stage``."""
        return self.placement.rank_of(self._checked_stage(stage))

    # ---- tied weights ----------------------------------------------------------------

    def tied_keys(self) -> dict[str, list[int]]:
        """Tied key -> sorted model stages that own a layer of it (all stages)."""
        owners: dict[str, set[int]] = {}
        for i, layer in enumerate(self.layer_specs):
            if isinstance(layer, TiedLayerSpec):
                owners.setdefault(layer.key, set()).add(self.layer_owner(i))
        return {key: sorted(stages) for key, stages in owners.items()}

    def tied_pipe_ranks(self) -> dict[str, list[int]]:
        """Tied key -> sorted pipe ranks owning it (the group whose gradients are summed; one
        rank when every copy lands there, as the embedding and head do on rank 0 of a V)."""
        return {key: sorted({self.placement.rank_of(s) for s in stages})
                for key, stages in self.tied_keys().items()}

    def tied_parameters(self, key: str) -> list[nn.Parameter]:
        """The local weights named by the key's ``tied_weight_attr`` ([] when no local
        stage owns the key)."""
        if key not in self._tied_first:
            raise ValueError(f"unknown tied key {key!r}; the keys are {sorted(self._tied_first)}")
        if key not in self.tied_modules:
            return []
        spec = self.layer_specs[self._tied_first[key]]
        return [_get_attr(self.tied_modules[key], p, key) for p in spec.tied_weight_attrs]

    # ---- reporting -------------------------------------------------------------------

    def describe(self) -> str:
        """A table of every model stage: layers, classes, parameters (tied counted once
        per stage). Counts come from meta-device builds: nothing is allocated."""
        rows = [("stage", "rank", "layers", "params", "classes")]
        for s in range(self.num_model_stages):
            lo, hi = self.parts[s], self.parts[s + 1]
            names, total, seen = [], 0, set()
            for i in range(lo, hi):
                layer = self.layer_specs[i]
                key = layer.key if isinstance(layer, TiedLayerSpec) else None
                names.append(_class_name(layer) + (f"[{key}]" if key else ""))
                if key not in seen:
                    total += _num_parameters(layer)
                if key:
                    seen.add(key)
            mark = "*" if s in self.stage_ids else ""
            rows.append((f"{s}{mark}", str(self.placement.rank_of(s)),
                         f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo), f"{total:,}",
                         ", ".join(names)))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows]
        return "\n".join(line.rstrip() for line in lines) + "\n(* = built in this process)"


def build_reference(layers: Sequence[Layer], loss_fn: Callable[..., torch.Tensor] | None = None,
                    seed: int = 1234, **kwargs: Any) -> PipelineModule:
    """The one-process model of the same layers: bit-identical at start to the union of
    every stage of any layout. Layout arguments (topology, pipe, pipe_rank,
    virtual_stages, partition_*, profile_input) are ignored, so a pipeline's kwargs
    can be passed as they are; ``activation_checkpoint_interval`` is kept."""
    kept = {k: v for k, v in kwargs.items() if k not in _LAYOUT_ONLY}
    return PipelineModule(layers, loss_fn=loss_fn, pipe=1, pipe_rank=0, seed=seed,
                          partition_method="uniform", **kept)
