"""``deepspeed.init_distributed``, ``deepspeed.initialize`` and ``deepspeed.add_config_arguments``.

``initialize`` resolves the config as DeepSpeed does (``config=``, ``config_params=`` or
``args.deepspeed_config``; a dict or a JSON path), translates it with
:func:`pipegrid.compat.deepspeed.from_config.translate` (every unsupported key in one error,
before the engine's process groups exist), puts the module's topology into the TrainConfig, and returns
``(engine, optimizer, training_dataloader, lr_scheduler)`` around a pipegrid PipelineEngine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.compat.deepspeed import config_keys
from pipegrid.compat.deepspeed.data import build_data_loader
from pipegrid.compat.deepspeed.engine import PipelineEngine
from pipegrid.compat.deepspeed.from_config import DeepSpeedConfigError, DeepSpeedTranslation, load_ds_config, translate
from pipegrid.compat.deepspeed.runtime.loss_scaler import DeepSpeedLossScaler

__all__ = ["add_config_arguments", "init_distributed", "initialize"]


def _timeout_s(timeout: datetime.timedelta | None) -> float | None:
    """The collective timeout: the argument, else DEEPSPEED_TIMEOUT (minutes, DeepSpeed's variable)."""
    if timeout is not None:
        return timeout.total_seconds()
    minutes = os.environ.get("DEEPSPEED_TIMEOUT")
    return float(minutes) * 60 if minutes else None


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True, distributed_port: int = 29500,
                     verbose: bool = True, timeout: datetime.timedelta | None = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: Any = None, rank: int = -1,
                     world_size: int = -1) -> None:
    """Join torch.distributed from torchrun's (or pipegrid's local launcher's) environment, unless it
    is joined already. One process without that environment runs alone (world size 1)."""
    if dist.is_available() and dist.is_initialized():
        return
    if dist_init_required is False:
        raise RuntimeError("dist_init_required=False but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first or drop the argument")
    if init_method is not None or rank >= 0 or world_size > 0:
        os.environ.update({k: str(v) for k, v in (("RANK", rank), ("WORLD_SIZE", world_size)) if v >= 0})
        if init_method is not None:
            os.environ["PIPEGRID_INIT_METHOD"] = init_method
    world = int(os.environ.get("WORLD_SIZE", "1"))
    comm: dict[str, Any] = {"backend": dist_backend or "auto"}
    if (seconds := _timeout_s(timeout)) is not None:
        comm["timeout_s"] = seconds
    # pipegrid joins (torchrun, its launcher's file store, or one process alone) and binds cores;
    # the 1 x world grid it also builds is only a vehicle for that
    pg.init_distributed({"topology": {"pipe": 1, "data": world, "tensor": 1}, "comm": comm})


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's ``--deepspeed`` and ``--deepspeed_config`` (and the deprecated ``--deepscale*``)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on the backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help="Deprecated: --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str, help="Deprecated: --deepspeed_config")
    return parser


def _resolve_config(args: Any, config: Any, config_params: Any) -> dict:
    """DeepSpeed's rules: ``config`` (or ``config_params``), or ``args.deepspeed_config``, not both."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError("got a DeepSpeed config both in args.deepspeed_config and in config=; pass one")
        config = from_args
    if config is None:
        raise ValueError("DeepSpeed requires --deepspeed_config to specify configuration file (or pass config= "
                         "a dict or a JSON path)")
    return load_ds_config(config)


def _client_optimizer_spec(optimizer: Any, module: torch.nn.Module) -> dict:
    """A torch optimizer instance as ``_target_`` + kwargs (pipegrid rebuilds it over its own parameters)."""
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer= as a callable is not supported: put the optimizer in the config's "
                        "\"optimizer\" section, or pass a torch.optim.Optimizer instance")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups; pipegrid's optimizer config "
                         "has one set of settings for all parameters: use one group (or the config's optimizer)")
    _check_parameters([p for g in optimizer.param_groups for p in g["params"]], module, "optimizer's parameters")
    cls = type(optimizer)
    accepted = inspect.signature(cls).parameters
    group = optimizer.param_groups[0]
    spec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items()
            if k in accepted and k != "params"}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **spec}


def _check_parameters(params: Any, module: torch.nn.Module, what: str) -> None:
    """``params`` must be the module's trainable parameters: pipegrid optimises exactly those."""
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        raise ValueError(f"{what} are param groups (dicts); pipegrid's optimizer config has one set of settings "
                         "for all parameters: pass the parameters themselves, or None")
    if {id(p) for p in params} != {id(p) for p in module.parameters() if p.requires_grad}:
        raise ValueError(f"{what} are not this process's trainable parameters of the PipelineModule (pipegrid "
                         "optimises exactly those); pass [p for p in model.parameters() if p.requires_grad], or None")


def _client_pieces(translation: DeepSpeedTranslation, optimizer: Any, module: torch.nn.Module,
                   ds: dict) -> DeepSpeedTranslation:
    """Put a client optimizer into the TrainConfig, with DeepSpeed's ZeRO refusal of untested ones."""
    if optimizer is None:
        return translation
    spec = _client_optimizer_spec(optimizer, module)
    refusal = config_keys.zero_supports(spec["_target_"], translation.config.zero.stage,
                                        bool(ds.get("zero_allow_untested_optimizer", False)))
    if refusal:
        raise DeepSpeedConfigError([refusal])
    config = dataclasses.replace(translation.config, optimizer=spec)
    return dataclasses.replace(translation, config=config, has_optimizer=True)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _topology(model: Any) -> pg.Topology:
    topology = getattr(model, "topology", None)
    if isinstance(topology, pg.Topology):
        return topology
    return pg.Topology(pipe=model.pipe, data=_world_size() // model.pipe)


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = 29500, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Callable | None = None, config: Any = None, mesh_param: Any = None,
               config_params: Any = None) -> tuple[PipelineEngine, Any, Any, Any]:
    """DeepSpeed's initialize for a PipelineModule: (engine, optimizer, training_dataloader, lr_scheduler).

    Every config problem is raised before any process group is made (a DeepSpeed script has
    usually joined torch.distributed already; the engine's groups come after the checks).
    """
    _check_arguments(model, mpu, mesh_param, lr_scheduler)
    ds = _resolve_config(args, config, config_params)
    topology = _topology(model)
    translation = translate(ds, world_size=_world_size(), pipe=topology.pipe, tensor=topology.tensor,
                            use_config_optimizer=optimizer is None, use_config_scheduler=lr_scheduler is None)
    translation = _client_pieces(translation, optimizer, model, ds)
    if model_parameters is not None:
        _check_parameters(model_parameters, model, "model_parameters")
    cfg = _finish_config(translation, model)
    init_distributed(dist_init_required=dist_init_required)
    if translation.activation_checkpoint_interval > 0:  # the config overrides the module, as on DeepSpeed
        model.activation_checkpoint_interval = translation.activation_checkpoint_interval
    engine = pg.initialize(model, cfg)
    if translation.loss_scaler is not None:  # DeepSpeed's fp16 rule in place of pipegrid's own
        engine.scaler = DeepSpeedLossScaler(**translation.loss_scaler)
    if lr_scheduler is not None:
        engine.lr_scheduler = lr_scheduler(engine.optimizer)
    loader = None
    if training_data is not None:
        loader = build_data_loader(training_data, translation.micro_batch_size, engine.groups.coord.data,
                                   topology.data, translation.dataloader_drop_last, collate_fn)
    adapter = PipelineEngine(engine, translation, loader)
    return adapter, adapter.optimizer, adapter.training_dataloader, engine.lr_scheduler


def _check_arguments(model: Any, mpu: Any, mesh_param: Any, lr_scheduler: Any) -> None:
    if model is None:
        raise ValueError("deepspeed.initialize requires a model")
    if not isinstance(model, pg.PipelineModule):
        raise TypeError(f"pipegrid runs pipeline models: pass a deepspeed.pipe.PipelineModule (from "
                        f"pipegrid.compat.deepspeed.pipe), got {type(model).__name__}")
    if mpu is not None or mesh_param is not None:
        raise ValueError("mpu must be None with pipeline parallelism (DeepSpeed's rule); mesh_param is not supported")
    if lr_scheduler is not None and (not callable(lr_scheduler)
                                     or isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler)):
        raise TypeError("lr_scheduler= must be a callable taking the optimizer (pipegrid builds its own optimizer, so "
                        "a scheduler built on yours would drive nothing); or use the config's \"scheduler\"")


def _finish_config(translation: DeepSpeedTranslation, model: Any) -> Any:
    """The TrainConfig translate() made (with the module's topology, explicitly), plus the module's
    dynamic_shape and DEEPSPEED_TIMEOUT."""
    cfg = translation.config
    if cfg.checkpoint.dir:
        raise ValueError("pipegrid.checkpoint.dir is not for the DeepSpeed adapter: save and resume with "
                         "engine.save_checkpoint(dir, tag) / engine.load_checkpoint(dir) as on DeepSpeed")
    cfg.comm.dynamic_shapes = bool(getattr(model, "dynamic_shape", False)) or cfg.comm.dynamic_shapes
    if (seconds := _timeout_s(None)) is not None:
        cfg.comm.timeout_s = seconds
    return cfg
