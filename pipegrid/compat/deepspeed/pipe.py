"""``deepspeed.pipe``: PipelineModule, LayerSpec, TiedLayerSpec and the topologies, over pipegrid's.

The module is a pipegrid PipelineModule (each process builds only its own stage) that
takes DeepSpeed's arguments and keeps DeepSpeed's behaviour where a script could see it:
``seed_layers=True`` builds layer i after seeding every generator with ``base_seed + i``
and reseeds before each layer's forward as DeepSpeed does (so dropout draws the same
masks); ``partition_method="parameters"`` and ``"type:REGEX"`` cut where DeepSpeed cuts.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import pipegrid as pg
from pipegrid.compat.deepspeed.runtime.utils import set_random_seed
from pipegrid.compat.deepspeed.topology import (PipeDataParallelTopology, PipeModelDataParallelTopology,
                                                ProcessTopology, as_topology)
from pipegrid.pipe.partition import partition_uniform

__all__ = ["LayerSpec", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineModule",
           "ProcessTopology", "TiedLayerSpec", "deepspeed_partition"]


def _check_module_class(typename: Any) -> None:
    if not (inspect.isclass(typename) and issubclass(typename, nn.Module)):
        raise TypeError(f"LayerSpec only supports torch.nn.Module types (as DeepSpeed), got {typename!r}; "
                        "pass the layer's class, e.g. LayerSpec(nn.Linear, 8, 16)")


class LayerSpec(pg.LayerSpec):
    """DeepSpeed's LayerSpec(typename, *module_args, **module_kwargs): a layer built by its stage only."""

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any) -> None:
        _check_module_class(typename)
        super().__init__(typename, *module_args, **module_kwargs)

    @property
    def module_args(self) -> tuple:
        return self.args

    @property
    def module_kwargs(self) -> dict:
        return self.kwargs

    def build(self, log: bool = False) -> nn.Module:  # ``log``: DeepSpeed's signature, no effect
        return super().build()


class TiedLayerSpec(pg.TiedLayerSpec):
    """DeepSpeed's TiedLayerSpec(key, typename, *args, forward_fn=None, tied_weight_attr=['weight'], **kwargs)."""

    def __init__(self, key: str, typename: type[nn.Module], *module_args: Any,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 tied_weight_attr: str | Sequence[str] = ("weight",), **module_kwargs: Any) -> None:
        _check_module_class(typename)
        super().__init__(key, typename, *module_args, forward_fn=forward_fn, tied_weight_attr=tied_weight_attr,
                         **module_kwargs)

    @property
    def tied_weight_attr(self) -> list[str]:  # type: ignore[override]
        """DeepSpeed keeps a list of attribute paths."""
        return list(self.tied_weight_attrs)

    module_args = LayerSpec.module_args
    module_kwargs = LayerSpec.module_kwargs


def deepspeed_partition(weights: Sequence[float], num_parts: int) -> list[int]:
    """DeepSpeed's balanced cut (``partition_balanced``): contiguous parts minimising the spread
    (heaviest minus lightest part), ties going to the later boundary; exact for integer weights."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    high = [[inf] * (m + 1) for _ in range(n + 1)]  # heaviest part of the best cut of i layers into j
    low = [[inf] * (m + 1) for _ in range(n + 1)]   # its lightest part
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    where = [[0] * (m + 1) for _ in range(n + 1)]
    high[0][0], cost[0][0] = 0.0, 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                top, bottom = max(high[k][j - 1], part), min(low[k][j - 1], part)
                if cost[i][j] >= top - bottom:  # unreachable k cost inf and lose to any valid one
                    cost[i][j], high[i][j], low[i][j], where[i][j] = top - bottom, top, bottom, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(where[parts[-1]][j])
    return parts[::-1]


def _trainable_parameters(layer: Any) -> int:
    """Parameters with requires_grad (DeepSpeed's count), from a meta-device build for a spec."""
    if isinstance(layer, pg.LayerSpec):
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            layer = layer.build()
    if not isinstance(layer, nn.Module):
        return 0
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


def _type_name(layer: Any) -> str | None:
    if isinstance(layer, pg.LayerSpec):
        return layer.class_name
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


def _ambient_seed() -> int:
    """A base seed drawn from torch's generator, so the script's seed decides the weights (as on
    DeepSpeed without seed_layers), and rank 0's everywhere, so replicas and tied copies agree."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _default_topology(num_stages: int) -> pg.Topology:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1 or world % num_stages:
        raise ValueError(f"num_stages ({num_stages}) must divide distributed world size ({world}); start a "
                         "multiple of num_stages processes or pass topology=")
    return pg.Topology(pipe=num_stages, data=world // num_stages)


class PipelineModule(pg.PipelineModule):
    """DeepSpeed's PipelineModule arguments over pipegrid's module (see the module docstring).

    ``seed_layers=False`` (DeepSpeed's default) builds each stage from the process's generator,
    so weights depend on the stage layout there; here layer i is built from ``s + i`` with ``s``
    drawn from torch's generator: the script's seed still decides the weights, and every layout
    gets the same ones. ``activation_checkpoint_func`` and ``seed_fn`` must stay unset (pipegrid
    recomputes with torch.utils.checkpoint and seeds torch); ``checkpointable_layers`` only
    changes memory in DeepSpeed and is kept for reference.
    """

    def __init__(self, layers: Sequence[Any], num_stages: int | None = None, topology: Any = None,
                 loss_fn: Callable[..., torch.Tensor] | None = None, seed_layers: bool = False,
                 seed_fn: Callable[[int], None] | None = None, base_seed: int = 1234,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable[..., Any] | None = None,
                 checkpointable_layers: list[str] | None = None, dynamic_shape: bool = False) -> None:
        if num_stages is None and topology is None:
            raise ValueError("must provide num_stages or topology (DeepSpeed's rule): PipelineModule(layers, "
                             "num_stages=2, ...)")
        for name, value, fix in (("seed_fn", seed_fn, "layer i is seeded with base_seed + i through torch"),
                                 ("activation_checkpoint_func", activation_checkpoint_func,
                                  "pipegrid recomputes with torch.utils.checkpoint")):
            if value is not None:
                raise ValueError(f"{name} is not supported: {fix}; remove the argument")
        topo = as_topology(topology) if topology is not None else _default_topology(num_stages)
        self.seed_layers, self.base_seed, self.micro_offset = bool(seed_layers), base_seed, 0
        self.checkpointable_layers, self.dynamic_shape = checkpointable_layers, dynamic_shape
        super().__init__(list(layers), loss_fn=loss_fn, topology=topo, pipe=num_stages,
                         partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         seed=base_seed if seed_layers else _ambient_seed())
        if self.seed_layers:
            self._seed_tied_copies()

    def _seed_tied_copies(self) -> None:
        """DeepSpeed builds a tied module on each stage under the seed of that stage's first use of the
        key and then copies only ``tied_weight_attr`` from the first owner: the module's other
        parameters (a Linear's bias) start different on each stage. pipegrid built every copy like
        the first owner's; give the others their own, as DeepSpeed does."""
        local = [i for s in self.stage_ids for i in range(self.parts[s], self.parts[s + 1])]
        for key, module in self.tied_modules.items():
            uses = [i for i, spec in enumerate(self.layer_specs)
                    if isinstance(spec, pg.TiedLayerSpec) and spec.key == key]
            first_here = min(i for i in uses if i in local)
            if first_here == uses[0]:
                continue
            spec = self.layer_specs[first_here]
            with torch.random.fork_rng(devices=[]):
                set_random_seed(self.base_seed + first_here)
                fresh = dict(spec.build().named_parameters())
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name not in spec.tied_weight_attrs:
                        param.copy_(fresh[name])

    def _partition(self, method: Any, costs: Any, profile_input: Any) -> list[int]:
        """DeepSpeed's cut for 'parameters' and 'type:REGEX'; pipegrid's for the rest."""
        name = method.lower() if isinstance(method, str) else None
        if name == "parameters":
            weights = [_trainable_parameters(layer) for layer in self.layer_specs]
        elif name is not None and name.startswith("type:"):
            pattern = re.compile(name.split(":")[1], re.IGNORECASE)
            names = [_type_name(layer) for layer in self.layer_specs]
            weights = [int(bool(n and pattern.search(n))) for n in names]
            if not any(weights):
                raise ValueError(f"partition_method={method!r} matches no layer's class name; the classes are "
                                 f"{sorted({n or '?' for n in names})}")
        else:
            return super()._partition(method, costs, profile_input)
        return deepspeed_partition(weights, self.num_model_stages)

    def forward(self, x: Any, stage: int | None = None) -> Any:
        if not self.seed_layers:
            return super().forward(x, stage)
        return self._seeded_forward(x, self._local_stage(stage))

    def _seeded_forward(self, x: Any, stage: int) -> Any:
        """DeepSpeed's forward with seed_layers: layer ``start + k`` of a chunk runs after seeding with
        ``base_seed * (micro_offset + 1) + first_layer + k`` (its offset counts forward calls; k
        restarts in each checkpointed chunk, as in DeepSpeed)."""
        self.micro_offset += 1
        offset, first = self.micro_offset + 1, self.parts[stage]
        calls = [self._call_of(index, layer) for index, layer in self.local_layers(stage)]

        def run(inputs: Any, start: int, end: int) -> Any:
            for k, call in enumerate(calls[start:end]):
                set_random_seed(self.base_seed * offset + first + k)
                inputs = call(inputs)
            return inputs

        every = self.activation_checkpoint_interval
        if every <= 0 or not torch.is_grad_enabled():
            return run(x, 0, len(calls))
        for start in range(0, len(calls), every):
            x = checkpoint(run, x, start, min(start + every, len(calls)), use_reentrant=False)
        return x

    def _call_of(self, index: int, layer: Any) -> Callable[[Any], Any]:
        spec = self.layer_specs[index]
        if isinstance(spec, pg.TiedLayerSpec) and spec.forward_fn is not None:
            return functools.partial(spec.forward_fn, layer)
        return layer

    # --- DeepSpeed's queries -------------------------------------------------------------
    def partitions(self) -> list[int]:
        """Stage boundaries: stage s holds layers ``parts[s]:parts[s+1]``."""
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        return self.layer_owner(layer_idx)

    @property
    def num_stages(self) -> int:
        """DeepSpeed's name for the pipe degree (pipegrid's ``pipe``)."""
        return self.pipe

    @property
    def stage_id(self) -> int:
        """DeepSpeed's name for this process's pipe rank (pipegrid's ``pipe_rank``)."""
        return self.pipe_rank

    def num_pipeline_stages(self) -> int:
        return self.pipe

    def set_checkpoint_interval(self, interval: int) -> None:
        self.activation_checkpoint_interval = interval

    def get_additional_losses(self) -> None:
        return None
