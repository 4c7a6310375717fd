"""DeepSpeed's ds_config.json as a pipegrid TrainConfig: the same training, key by key.

``from_deepspeed(ds_config, world_size=N, pipe=P)`` translates every key pipegrid honours
with DeepSpeed 0.19's semantics (its batch-size rule, optimizer defaults, LR schedules,
loss scaling) and refuses everything else in one error that lists each key and its fix.
``python -m pipegrid.compat.deepspeed.from_config ds_config.json --world-size N --pipe P`` prints
the equivalent Hydra overrides and YAML (``python -m pipegrid.conf.from_deepspeed`` still
runs it). Pure: no process group, no DeepSpeed import.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import Any

from pipegrid.compat.deepspeed import config_keys as keys
from pipegrid.conf.schema import TrainConfig, to_train_config

__all__ = ["DeepSpeedConfigError", "DeepSpeedTranslation", "batch_sizes", "from_deepspeed",
           "load_ds_config", "to_overrides", "to_yaml", "translate"]


class DeepSpeedConfigError(ValueError):
    """A ds_config pipegrid cannot run as DeepSpeed would; ``problems`` lists every key and its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} setting(s) of the DeepSpeed config cannot run on pipegrid as "
                         f"they would on DeepSpeed (nothing was started):\n{lines}")


@dataclasses.dataclass
class DeepSpeedTranslation:
    """A ds_config in pipegrid's terms: the TrainConfig plus what lives outside it."""

    config: TrainConfig
    """Everything the engine takes (topology, schedule, optimizer, LR schedule, ZeRO, precision...)."""
    train_batch_size: int
    micro_batch_size: int
    """Samples per micro-batch per data rank (the data loader's batch size)."""
    gradient_accumulation_steps: int
    steps_per_print: int | None = 10
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    dataloader_drop_last: bool = False
    activation_checkpoint_interval: int = 0
    """pipeline.activation_checkpoint_interval: set on the module when > 0 (DeepSpeed does the same)."""
    loss_scaler: dict[str, Any] | None = None
    """fp16: DeepSpeed's loss-scale rule (arguments of the compat DeepSpeedLossScaler)."""
    has_optimizer: bool = True
    """False when the ds_config names no optimizer: training then fails, as it does on DeepSpeed."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Where the result may differ from DeepSpeed's, and why."""


def load_ds_config(ds_config: str | os.PathLike | dict) -> dict:
    """A ds_config as a dict: a dict as is (copied), or a JSON file."""
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if not isinstance(ds_config, (str, os.PathLike)):
        raise TypeError(f"ds_config must be a dict or a path to a JSON file, got {type(ds_config).__name__}")
    try:
        with open(ds_config) as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read DeepSpeed config {os.fspath(ds_config)!r}: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {os.fspath(ds_config)!r} must hold a JSON object, got "
                         f"{type(loaded).__name__}")
    return loaded


def batch_sizes(ds_config: dict, data_parallel: int) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_size, gradient_accumulation_steps) by DeepSpeed's rule.

    Two given derive the third (integer division, as DeepSpeed); train_batch_size alone means
    one accumulation step; then train = micro x accumulation x data-parallel size must hold.
    """
    train = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    acc = ds_config.get("gradient_accumulation_steps")
    for name, value in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", acc)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if train is not None and micro is not None and acc is None:
        acc = train // micro // data_parallel
    elif train is not None and acc is not None and micro is None:
        micro = train // data_parallel // acc if acc else 0
    elif micro is not None and acc is not None and train is None:
        train = micro * acc * data_parallel
    elif train is not None and micro is None and acc is None:
        acc, micro = 1, train // data_parallel
    elif micro is not None and train is None and acc is None:
        train, acc = micro * data_parallel, 1
    elif train is None and micro is None:
        raise ValueError("either train_batch_size or train_micro_batch_size_per_gpu needs to be provided "
                         "(DeepSpeed's rule); set train_micro_batch_size_per_gpu")
    for name, value in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", acc)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value} (derived from the batch sizes given and "
                             f"data-parallel size {data_parallel})")
    if train != micro * acc * data_parallel:
        raise ValueError(f"train_batch_size must equal train_micro_batch_size_per_gpu x gradient_accumulation_"
                         f"steps x data-parallel size: {train} != {micro} x {acc} x {data_parallel}; fix one "
                         "of the three or the number of processes (DeepSpeed refuses it too)")
    return train, micro, acc


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in ("optimizer", "lr_scheduler"):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def translate(ds_config: str | os.PathLike | dict, world_size: int, pipe: int = 1, tensor: int = 1,
              use_config_optimizer: bool = True, use_config_scheduler: bool = True) -> DeepSpeedTranslation:
    """Translate a ds_config for ``world_size`` processes cut into ``pipe`` stages (x ``tensor``).

    ``use_config_optimizer``/``use_config_scheduler`` False: the caller passes its own (as
    ``deepspeed.initialize(optimizer=..., lr_scheduler=...)`` do), so those sections are ignored.
    Raises :class:`DeepSpeedConfigError` listing every key that cannot be honoured.
    """
    ds = load_ds_config(ds_config)
    if world_size % (pipe * tensor):
        raise ValueError(f"world size {world_size} is not a multiple of pipe {pipe} x tensor {tensor}; "
                         "start pipe x data x tensor processes")
    data = world_size // (pipe * tensor)
    problems: list[str] = []
    notes: list[str] = []
    keys.check_top_level(ds, problems)
    try:
        train, micro, acc = batch_sizes(ds, data)
    except ValueError as error:
        problems.append(str(error))
        train = micro = acc = 1
    native, extras = _sections(ds, use_config_optimizer, use_config_scheduler, pipe, problems, notes)
    native["topology"] = {"pipe": pipe, "data": data, "tensor": tensor}
    native["schedule"] = {"name": "1f1b", "micro_batches": acc, "virtual_stages": 1}
    overrides = ds.get("pipegrid") or {}
    if not isinstance(overrides, dict):
        problems.append(f"pipegrid (native overrides) must be a JSON object, got {overrides!r}")
    config = None
    if not problems:
        try:
            config = to_train_config(_merge(native, copy.deepcopy(overrides)))
        except (ValueError, TypeError) as error:
            problems.append(f"pipegrid section: {error}")
    if problems:
        raise DeepSpeedConfigError(problems)
    return DeepSpeedTranslation(config, train, micro, acc, notes=notes, **extras)


def _sections(ds: dict, use_config_optimizer: bool, use_config_scheduler: bool, pipe: int, problems: list[str],
              notes: list[str]) -> tuple[dict, dict]:
    """The TrainConfig sections other than topology and schedule, and the translation's other fields."""
    stage = keys.zero_stage_of(ds, problems)
    optimizer = keys.optimizer_spec(ds.get("optimizer"), problems) if use_config_optimizer else None
    allow_untested = keys.scalar(ds, "zero_allow_untested_optimizer", bool, False, problems)
    if optimizer is not None and (refusal := keys.zero_supports(optimizer["_target_"], stage, allow_untested)):
        problems.append(refusal)
    scheduler = keys.scheduler_spec(ds.get("scheduler"), problems) if use_config_scheduler else None
    precision, scaler, on_nonfinite = keys.precision_of(ds, stage, problems, notes)
    if on_nonfinite == "raise" and precision["dtype"] == "float32":
        notes.append("fp32: a NaN/inf loss stops training with an error (DeepSpeed would apply the step)")
    if stage >= 2:
        notes.append(f"zero_optimization.stage={stage}: DeepSpeed reduces gradients every micro-batch, bucket by "
                     "bucket; pipegrid reduces once a step by default (m x less traffic, a full-size fp32 "
                     "gradient buffer during the backwards): set zero.reduce_every_micro_batch=true for "
                     "DeepSpeed's memory (reduce_bucket_size is zero.bucket_elements)")
    clip = keys.scalar(ds, "gradient_clipping", float, 0.0, problems)
    steps_per_print = keys.scalar(ds, "steps_per_print", int, 10, problems, minimum=1)
    flags = {k: keys.scalar(ds, k, bool, False, problems)
             for k in ("wall_clock_breakdown", "memory_breakdown", "dataloader_drop_last")}
    keys.scalar(ds, "zero_force_ds_cpu_optimizer", bool, True, problems)
    native = {"optimizer": optimizer or {"_target_": "torch.optim.SGD", "lr": 0.0},
              "lr_scheduler": scheduler, "precision": precision,
              "zero": {"stage": stage, "offload_optimizer": keys.offload_of(ds, stage, problems),
                       **keys.zero_buckets_of(ds, problems)},
              "train": {"grad_clip": clip, "log_interval": steps_per_print or 10, "on_nonfinite": on_nonfinite},
              "trace": {"enabled": flags["wall_clock_breakdown"]}}
    extras = {"steps_per_print": steps_per_print, **flags, "loss_scaler": scaler,
              "activation_checkpoint_interval": keys.pipeline_interval(ds, pipe, problems),
              "has_optimizer": use_config_optimizer and optimizer is not None}
    return native, extras


def from_deepspeed(ds_config: str | os.PathLike | dict, world_size: int, pipe: int = 1,
                   tensor: int = 1) -> TrainConfig:
    """The TrainConfig that trains like ``ds_config`` on ``world_size`` processes in ``pipe`` stages."""
    return translate(ds_config, world_size, pipe, tensor).config


# --- printing ------------------------------------------------------------------------
_SECTIONS = ("topology", "schedule", "optimizer", "lr_scheduler", "zero", "precision", "train", "trace")
_ALWAYS = {"topology", "schedule.name", "schedule.micro_batches", "zero.stage", "precision.dtype",
           "train.grad_clip"}


def _native_tree(translation: DeepSpeedTranslation) -> dict:
    """The translated sections, each key kept when the translation set it away from the schema default."""
    tree, default = dataclasses.asdict(translation.config), dataclasses.asdict(TrainConfig())
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        if not isinstance(tree[section], dict) or section in ("optimizer", "lr_scheduler"):
            out[section] = tree[section]
            continue
        out[section] = {key: value for key, value in tree[section].items()
                        if section in _ALWAYS or f"{section}.{key}" in _ALWAYS or value != default[section][key]}
    return {key: value for key, value in out.items() if value != {}}


def _hydra_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_overrides(translation: DeepSpeedTranslation) -> list[str]:
    """Hydra command-line overrides for an app composed from pipegrid's packaged configs.

    ``optimizer`` and ``lr_scheduler`` replace the app's whole entry, so no key of its preset
    survives: the optimizer by ``~`` then ``+``, the scheduler by ``null`` then the new one (which
    also works on an app that has none).
    """
    out = []
    for section, values in _native_tree(translation).items():
        if section == "optimizer":
            out += [f"'~{section}'", f"'+{section}={_hydra_value(values)}'"]
        elif section == "lr_scheduler":
            out += [f"{section}=null"] + ([f"'{section}={_hydra_value(values)}'"] if values else [])
        else:
            out += [f"{section}.{key}={_hydra_value(value)}" for key, value in values.items()]
    return out


def to_yaml(translation: DeepSpeedTranslation) -> str:
    """The translated sections as YAML (``OmegaConf.load`` it and pass it to ``pipegrid.initialize``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(_native_tree(translation)))


def _notes(translation: DeepSpeedTranslation) -> list[str]:
    t = translation
    notes = [f"micro-batches of {t.micro_batch_size} samples per data rank (train_micro_batch_size_per_gpu; "
             f"train_batch_size {t.train_batch_size}); pipegrid configs carry no batch size, your data "
             "iterator decides"]
    if t.activation_checkpoint_interval:
        notes.append(f"set activation_checkpoint_interval={t.activation_checkpoint_interval} on the PipelineModule")
    if not t.has_optimizer:
        notes.append("the ds_config names no optimizer: set one (the placeholder SGD lr=0 trains nothing)")
    return notes + t.notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipegrid.compat.deepspeed.from_config",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("ds_config", help="DeepSpeed JSON config (ds_config.json)")
    parser.add_argument("--world-size", type=int, required=True, help="processes the job runs on")
    parser.add_argument("--pipe", type=int, default=1, help="pipeline stages (the PipelineModule's num_stages)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree (num_mp)")
    args = parser.parse_args(argv)
    try:
        translation = translate(args.ds_config, args.world_size, args.pipe, args.tensor)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    topo = translation.config.topology
    print(f"# pipegrid equivalent of {args.ds_config} on {args.world_size} processes "
          f"(pipe {topo.pipe} x data {topo.data} x tensor {topo.tensor})")
    print("# Hydra overrides (apps on pipegrid's packaged configs, e.g. examples/train_gpt.py):")
    print(" ".join(to_overrides(translation)))
    print("# YAML (OmegaConf.load it and pass it to pipegrid.initialize):")
    print(to_yaml(translation), end="")
    print("# Notes:")
    for note in _notes(translation):
        print(f"# - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
