"""Turn a composed config into a checked app dataclass, before any process is started.

Hydra already refuses misspelt keys and wrong types; this adds what it lets through
(keys added with ``+``, optimizer arguments the optimizer does not take) and the rules
that span sections: the world size, the schedule, the model's cut into stages and its
split for tensor parallelism. Every error names the keys and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any, TypeVar

from pipegrid.conf.apps import GPTAppConfig, MLPAppConfig
from pipegrid.conf.schema import TrainConfig
from pipegrid.schedules import ScheduleError, build

App = TypeVar("App", bound=TrainConfig)
_FREE_FORM = ("optimizer", "lr_scheduler")  # `_target_` + the callable's keyword arguments


def to_app_config(config: Any, schema: type[App] | None = None, world_size: int | None = None) -> App:
    """Check ``config`` (a composed DictConfig, or a dict) and return it as ``schema``.

    ``schema`` defaults to the DictConfig's own dataclass type. ``world_size`` (the
    processes already started, e.g. torchrun's WORLD_SIZE) must match the topology;
    None means the launcher will start as many as the topology needs.
    """
    from omegaconf import OmegaConf  # conf/ may import OmegaConf; library modules never do

    if schema is None:
        schema = OmegaConf.get_type(config) if OmegaConf.is_config(config) else None
        if not (isinstance(schema, type) and issubclass(schema, TrainConfig)):
            raise TypeError("pass schema= (e.g. pipegrid.conf.apps.GPTAppConfig) to check a plain "
                            f"config; got {type(config).__name__} without a dataclass type")
    if OmegaConf.is_config(config):
        tree = OmegaConf.to_container(config, resolve=True)
    elif isinstance(config, dict):
        tree = dict(config)
    else:
        raise TypeError(f"config must be a DictConfig or a dict, got {type(config).__name__}")
    check_known_keys(tree, schema)
    # optimizer/lr_scheduler are free-form: a given one replaces the default, never merges into it
    free_form = {name: tree.pop(name) for name in _FREE_FORM if name in tree}
    app = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), tree))  # runs __post_init__
    for name, spec in free_form.items():
        setattr(app, name, dict(spec) if spec is not None else None)
    app.__post_init__()  # type: ignore[attr-defined]
    for name in _FREE_FORM:
        check_target_kwargs(name, getattr(app, name))
    check_layout(app, world_size)
    return app  # type: ignore[return-value]


def check_known_keys(tree: dict, schema: type, prefix: str = "") -> None:
    """Refuse keys that are not fields of ``schema`` (typically smuggled in with ``+key=...``)."""
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown config key {path!r} (added with '+'?): {schema.__name__} has no field "
                             f"{key!r}; its fields are {sorted(fields)}. Remove the override or fix the name")
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            check_known_keys(value, sub, prefix=f"{path}.")


def check_target_kwargs(section: str, spec: dict[str, Any] | None) -> None:
    """Each key of ``section`` besides ``_target_`` must be a keyword of the target callable."""
    if spec is None:
        return
    target = spec["_target_"]
    module_name, _, attr = str(target).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{section}._target_={target!r} cannot be imported ({error}); give a dotted "
                         "path such as torch.optim.AdamW") from None
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("self", "params", "optimizer")]
    unknown = sorted(set(spec) - {"_target_"} - set(accepted))
    if unknown:
        raise ValueError(f"{section} keys {unknown} are not arguments of {target} (it takes {accepted}); "
                         f"remove them or fix their names")


def check_layout(app: TrainConfig, world_size: int | None = None) -> None:
    """Cross-section rules: world size, schedule, stages vs layers, tensor-parallel splits."""
    topo, sched = app.topology, app.schedule
    needed = topo.world_size
    if world_size is not None and world_size != needed:
        raise ValueError(f"topology needs {needed} processes (pipe={topo.pipe} x data={topo.data} x "
                         f"tensor={topo.tensor}), got WORLD_SIZE={world_size}; change topology.pipe/data/"
                         f"tensor so their product is {world_size} or start {needed} processes")
    try:
        build(sched.name, topo.pipe, sched.micro_batches, sched.virtual_stages, coalesce=sched.coalesce)
    except ScheduleError as error:
        raise ScheduleError(f"schedule {sched.name!r} cannot run with topology.pipe={topo.pipe}, "
                            f"schedule.micro_batches={sched.micro_batches}, schedule.virtual_stages="
                            f"{sched.virtual_stages}, schedule.coalesce={sched.coalesce}: {error}") from None
    model = getattr(app, "model", None)
    if hasattr(model, "pipeline_layers"):  # the app's model says how many layers it lists
        _check_cut(app, layers=model.pipeline_layers(), knob=model.LAYERS_KNOB)
    if isinstance(app, GPTAppConfig):
        _check_tensor_splits(app)
    elif isinstance(app, MLPAppConfig):
        if topo.tensor > 1:
            raise ValueError(f"the MLP example has no tensor-parallel layers, got topology.tensor={topo.tensor}; "
                             "set topology.tensor=1 (use topology.data for more processes)")


def _check_tensor_splits(app: GPTAppConfig) -> None:
    model, tensor = app.model, app.topology.tensor
    if model.sequence_parallel and (tensor < 2 or model.seq_len % tensor):
        raise ValueError(f"model.sequence_parallel=true splits model.seq_len={model.seq_len} over "
                         f"topology.tensor={tensor} ranks; it needs topology.tensor >= 2 dividing seq_len: set "
                         "topology.tensor (and model.seq_len) so, or model.sequence_parallel=false")
    for name in ("vocab_size", "n_head", "n_embd"):
        value = getattr(model, name)
        if value % tensor:
            fit = -(-value // tensor) * tensor
            raise ValueError(f"tensor parallelism splits model.{name} over topology.tensor={tensor} ranks, "
                             f"but {value} is not divisible by {tensor}; set model.{name}={fit} or change "
                             "topology.tensor")


def _check_cut(app: TrainConfig, layers: int, knob: str) -> None:
    stages = app.topology.pipe * app.schedule.virtual_stages
    if stages > layers:
        raise ValueError(f"the model has {layers} pipeline layers but topology.pipe={app.topology.pipe} x "
                         f"schedule.virtual_stages={app.schedule.virtual_stages} = {stages} stages need one "
                         f"each; raise {knob} or use fewer stages")
