"""DeepSpeed config sections, key by key: what each means in pipegrid's terms, or why it is refused.

Each function reads one section of a ds_config with DeepSpeed 0.19's defaults and appends
every key it cannot honour to ``problems`` (a list of "key: why; fix" lines), so that
:func:`pipegrid.compat.deepspeed.from_config.translate` reports them all in one error.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from pipegrid.compat.deepspeed.runtime import lr_schedules

__all__ = ["DS_SCHEDULES", "SCHEDULES_MODULE", "check_top_level", "optimizer_spec", "pipeline_interval",
           "offload_of", "precision_of", "scalar", "scheduler_spec", "zero_buckets_of", "zero_stage_of",
           "zero_supports"]

SCHEDULES_MODULE = lr_schedules.__name__
"""Where DeepSpeed's LR schedules live as torch schedulers (the ``_target_`` of a translated ``scheduler``)."""


def _schedule_table() -> dict[str, tuple[set[str], set[str]]]:
    """Each schedule of :mod:`~pipegrid.compat.deepspeed.runtime.lr_schedules` (its ``__all__``) with
    (required params, accepted params), read from its signature: every argument but ``optimizer`` and
    ``last_batch_iteration``, required when it has no default."""
    table = {}
    for name in lr_schedules.__all__:
        params = [p for p in inspect.signature(getattr(lr_schedules, name)).parameters.values()
                  if p.name not in ("optimizer", "last_batch_iteration")]
        table[name] = ({p.name for p in params if p.default is inspect.Parameter.empty}, {p.name for p in params})
    return table


DS_SCHEDULES: dict[str, tuple[set[str], set[str]]] = _schedule_table()
"""DeepSpeed's own schedules by ``scheduler.type``: (required params, accepted params)."""

# DeepSpeed's FusedAdam (what "Adam"/"AdamW" build unless torch_adam): its arguments and defaults
_FUSED_ADAM = {"lr": 1e-3, "bias_correction": True, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
               "amsgrad": False, "set_grad_none": True}
_NO_TORCH_OPTIMIZER = {"lamb": "DeepSpeed's FusedLamb (a CUDA kernel)", "lion": "DeepSpeed's FusedLion",
                       "muadam": "mup's MuAdam", "muadamw": "mup's MuAdamW", "musgd": "mup's MuSGD",
                       "muon": "DeepSpeed's MuonWithAuxAdam", "onebitadam": "DeepSpeed's 1-bit Adam",
                       "zerooneadam": "DeepSpeed's 0/1 Adam", "onebitlamb": "DeepSpeed's 1-bit LAMB"}
_ZERO_TESTED = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.Adagrad")  # DeepSpeed's ZERO_SUPPORTED_OPTIMIZERS
_HANDLED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
            "scheduler", "gradient_clipping", "fp16", "bf16", "bfloat16", "zero_optimization",
            "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "pipeline", "activation_checkpointing",
            "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dataloader_drop_last", "pipegrid"}
# accepted only at DeepSpeed's default, where they change nothing
_DEFAULT_ONLY = {"prescale_gradients": False, "gradient_predivide_factor": 1.0, "sparse_gradients": False,
                 "communication_data_type": None, "disable_allgather": False, "dump_state": False}
# performance knobs of DeepSpeed's ZeRO-1 with no effect on results (reduce_bucket_size: zero_buckets_of)
_ZERO_KNOBS = {"contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
               "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
               "round_robin_gradients", "sub_group_size", "ignore_unused_parameters", "legacy_stage1",
               "use_multi_rank_bucket_allreduce", "memory_efficient_linear", "zero_force_ds_cpu_optimizer",
               "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
               "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save"}
_PIPELINE_KEYS = {"stages", "partition", "seed_layers", "activation_checkpoint_interval", "pipe_partitioned",
                  "grad_partitioned", "use_reentrant"}
_CHECKPOINTING_KEYS = {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                       "number_checkpoints", "synchronize_checkpoint_boundary", "profile"}
_FP16_KEYS = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
              "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"}
_BF16_KEYS = {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
              "bf16_optimizer_states"}


def zero_supports(target: str, zero_stage: int, allow_untested: bool) -> str | None:
    """DeepSpeed's refusal of an optimizer it has not tested with ZeRO, or None."""
    if zero_stage == 0 or allow_untested or target in _ZERO_TESTED:
        return None
    return (f"optimizer {target} with zero_optimization.stage={zero_stage}: DeepSpeed refuses optimizers it "
            "has not tested with ZeRO (Adam, AdamW, Adagrad); add \"zero_allow_untested_optimizer\": true")


def _kwargs_problem(section: str, target: str, kwargs: dict) -> str | None:
    module_name, _, name = target.rpartition(".")
    fn = getattr(importlib.import_module(module_name), name)
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    unknown = sorted(set(kwargs) - set(params) - {"_target_"})
    if unknown:
        accepted = [p for p in params if p not in ("self", "params", "optimizer")]
        return f"{section} {unknown} are not arguments of {target} (it takes {accepted}); remove or rename them"
    return None


def _adam(name: str, params: dict, problems: list[str]) -> dict:
    """DeepSpeed's Adam/AdamW: decoupled weight decay unless adam_w_mode=false (AdamW always)."""
    adam_w_mode = bool(params.pop("adam_w_mode", True))
    adam_w = name == "adamw" or adam_w_mode  # "AdamW" is decoupled whatever adam_w_mode says
    torch_adam = bool(params.pop("torch_adam", False))
    params.pop("fp32_optimizer_states", None)  # CPU offload only
    target = "torch.optim.AdamW" if adam_w else "torch.optim.Adam"
    if torch_adam:  # torch's class with torch's defaults (AdamW: weight_decay=0.01); DeepSpeed passes foreach
        return {"_target_": target, **params, "foreach": params.get("foreach")}
    unknown = sorted(set(params) - set(_FUSED_ADAM))
    if unknown:
        problems.append(f"optimizer.params {unknown} are not arguments of DeepSpeed's FusedAdam (it takes "
                        f"{sorted(_FUSED_ADAM)}); remove them")
    if not params.get("bias_correction", True):
        problems.append("optimizer.params.bias_correction=false: torch's Adam always corrects the moments' "
                        "bias; remove the key")
    if params.get("amsgrad", False):
        problems.append("optimizer.params.amsgrad=true: DeepSpeed's FusedAdam refuses it too; remove it")
    spec = {"_target_": target}
    spec.update({k: params.get(k, _FUSED_ADAM[k]) for k in ("lr", "betas", "eps", "weight_decay")})
    spec["betas"] = list(spec["betas"])
    return spec


def optimizer_spec(section: Any, problems: list[str]) -> dict | None:
    """The ``optimizer`` section as ``_target_`` + kwargs, built as DeepSpeed's _configure_basic_optimizer
    would: Adam/AdamW (case-insensitive) are FusedAdam (defaults lr 1e-3, weight_decay 0) unless
    ``torch_adam``; Adagrad is torch's; any other name is looked up in torch.optim as given."""
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        problems.append(f"optimizer must be {{\"type\": NAME, \"params\": {{...}}}}, got {section!r}")
        return None
    extra = sorted(set(section) - {"type", "params", "legacy_fusion"})
    if extra or section.get("legacy_fusion", False):
        problems.append(f"optimizer keys {extra or ['legacy_fusion']} are not supported; remove them")
    name, params = section["type"], dict(section.get("params") or {})
    lower = name.lower()
    if "max_grad_norm" in params:
        problems.append("optimizer.params.max_grad_norm: DeepSpeed refuses it too; use \"gradient_clipping\"")
        params.pop("max_grad_norm")
    if lower in ("adam", "adamw"):
        spec = _adam(lower, params, problems)
    elif lower == "adagrad":
        spec = {"_target_": "torch.optim.Adagrad", **params}
    elif lower in _NO_TORCH_OPTIMIZER:
        problems.append(f"optimizer.type={name!r} is {_NO_TORCH_OPTIMIZER[lower]}, which pipegrid does not have; "
                        "use Adam, AdamW, Adagrad or a torch.optim class such as SGD")
        return None
    elif inspect.isclass(getattr(importlib.import_module("torch.optim"), name, None)):
        spec = {"_target_": f"torch.optim.{name}", **params}
    else:
        problems.append(f"optimizer.type={name!r} is neither a DeepSpeed optimizer nor a torch.optim class "
                        "(DeepSpeed fails on it too); use e.g. Adam, AdamW or SGD (torch names are case-sensitive)")
        return None
    problem = _kwargs_problem("optimizer.params", spec["_target_"], spec)
    if problem:
        problems.append(problem)
    return spec


def scheduler_spec(section: Any, problems: list[str]) -> dict | None:
    """The ``scheduler`` section: DeepSpeed's own schedules first, else torch.optim.lr_scheduler's."""
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        problems.append(f"scheduler must be {{\"type\": NAME, \"params\": {{...}}}}, got {section!r}")
        return None
    name, params = section["type"], dict(section.get("params") or {})
    if "last_batch_iteration" in params:
        problems.append("scheduler.params.last_batch_iteration: pipegrid restores the schedule's position from "
                        "checkpoints (engine.load_checkpoint); remove the key")
        params.pop("last_batch_iteration")
    if name in DS_SCHEDULES:
        required, accepted = DS_SCHEDULES[name]
        missing, unknown = sorted(required - set(params)), sorted(set(params) - accepted)
        if missing or unknown:
            problems.append(f"scheduler {name}: params missing {missing}, unknown {unknown} (it takes "
                            f"{sorted(accepted)}); DeepSpeed fails on these too")
        return {"_target_": f"{SCHEDULES_MODULE}.{name}", **params}
    if inspect.isclass(getattr(importlib.import_module("torch.optim.lr_scheduler"), name, None)):
        spec = {"_target_": f"torch.optim.lr_scheduler.{name}", **params}
        problem = _kwargs_problem("scheduler.params", spec["_target_"], spec)
        if problem:
            problems.append(problem)
        return spec
    problems.append(f"scheduler.type={name!r} is neither a DeepSpeed schedule ({', '.join(DS_SCHEDULES)}) nor a "
                    "torch.optim.lr_scheduler class (DeepSpeed does not recognise it either)")
    return None


def _section(ds: dict, key: str, problems: list[str]) -> dict:
    value = ds.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key} must be a JSON object, got {value!r}")
        return {}
    return value


def _unknown_keys(section: dict, name: str, known: set[str], problems: list[str]) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        problems.append(f"{name} keys {unknown} are not supported (known: {sorted(known)}); remove them")


def _fp16(fp16: dict, zero_stage: int, problems: list[str]) -> tuple[dict, dict]:
    """precision.* and DeepSpeed's loss-scale rule (ZeRO-0's fp16 optimizer ignores hysteresis)."""
    if fp16.get("fp16_master_weights_and_grads", False):
        problems.append("fp16.fp16_master_weights_and_grads=true (fp16 master weights with CPU Adam) is not "
                        "supported; remove it (pipegrid keeps fp32 master weights)")
    try:
        static = float(fp16.get("loss_scale", 0))
        power, window = int(fp16.get("initial_scale_power", 16)), int(fp16.get("loss_scale_window", 1000))
        hysteresis, min_scale = int(fp16.get("hysteresis", 2)), float(fp16.get("min_loss_scale", 1))
    except (TypeError, ValueError) as error:
        problems.append(f"fp16 loss-scale settings must be numbers: {error}")
        static, power, window, hysteresis, min_scale = 0.0, 16, 1000, 2, 1.0
    if static < 0 or window < 1 or hysteresis < 1 or min_scale <= 0:
        problems.append("fp16 needs loss_scale >= 0, loss_scale_window >= 1, hysteresis >= 1 and min_loss_scale "
                        f"> 0, got {static}, {window}, {hysteresis}, {min_scale}")
    with_zero = zero_stage > 0  # ZeRO-1 uses DynamicLossScaler (hysteresis); FP16_Optimizer does not
    scaler = {"dynamic": static == 0, "init_scale": static or 2.0 ** power,
              "scale_window": window, "min_scale": min_scale, "delayed_shift": hysteresis if with_zero else 1,
              "consecutive_hysteresis": bool(fp16.get("consecutive_hysteresis", False)) and with_zero,
              "raise_error_at_min_scale": with_zero}
    precision = {"dtype": "float16", "initial_loss_scale": scaler["init_scale"], "growth_interval": window,
                 "backoff_factor": 0.5, "hysteresis": scaler["delayed_shift"], "min_loss_scale": min_scale}
    return precision, scaler


def precision_of(ds: dict, zero_stage: int, problems: list[str],
                 notes: list[str]) -> tuple[dict, dict | None, str]:
    """(precision.* keys, the fp16 loss-scale rule or None, train.on_nonfinite) from fp16/bf16.

    bf16 with check_grad_overflow (DeepSpeed's default) skips a step whose values overflow;
    pipegrid skips on a non-finite loss. fp32: DeepSpeed applies such a step, pipegrid raises.
    """
    fp16 = _section(ds, "fp16", problems)
    bf16 = _section(ds, "bf16" if "bf16" in ds else "bfloat16", problems)
    _unknown_keys(fp16, "fp16", _FP16_KEYS, problems)
    _unknown_keys(bf16, "bf16", _BF16_KEYS, problems)
    if fp16.get("enabled") and bf16.get("enabled"):
        problems.append("fp16 and bf16 are both enabled; DeepSpeed refuses that too; enable one")
    if fp16.get("enabled"):
        precision, scaler = _fp16(fp16, zero_stage, problems)
        notes.append("fp16: the adapter applies DeepSpeed's loss-scale rule; a native config gets pipegrid's "
                     "scaler, which raises the scale after growth_interval clean steps (DeepSpeed: one more the "
                     "first time) and restores hysteresis after each lowering")
        return precision, scaler, "raise"
    if bf16.get("enabled"):
        for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
            if bf16.get(key, False):
                problems.append(f"bf16.{key}=true (bf16 master weights or optimizer states) is not supported; "
                                "remove it (pipegrid keeps fp32 master weights and optimizer state)")
        if zero_stage == 0:
            notes.append("bf16 without ZeRO: DeepSpeed sums micro-batch gradients in fp32, pipegrid in bf16; "
                         "with gradient_accumulation_steps > 1 results differ by bf16 rounding")
        return {"dtype": "bfloat16"}, None, "skip" if bf16.get("check_grad_overflow", True) else "raise"
    return {"dtype": "float32"}, None, "raise"


def zero_stage_of(ds: dict, problems: list[str]) -> int:
    """zero_optimization.stage (0 to 3); ZeRO's bucket and prefetch knobs accepted, without effect."""
    zero = _section(ds, "zero_optimization", problems)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}; set one of them")
    _unknown_keys(zero, "zero_optimization", _ZERO_KNOBS | {"stage", "offload_optimizer", "offload_param",
                                                            "cpu_offload", "cpu_offload_params"}, problems)
    return stage if stage in (0, 1, 2, 3) else 0


def zero_buckets_of(ds: dict, problems: list[str]) -> dict:
    """zero_optimization.reduce_bucket_size (elements, as in DeepSpeed) -> zero.bucket_elements: the
    bucket size of ZeRO-2/3's reduction during backward (zero.reduce_every_micro_batch=true)."""
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if "reduce_bucket_size" not in zero:
        return {}
    size = zero["reduce_bucket_size"]
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 1 or size != int(size):
        problems.append(f"zero_optimization.reduce_bucket_size must be a positive whole number of elements, got "
                        f"{size!r}; e.g. 5e8 (DeepSpeed's default)")
        return {}
    return {"bucket_elements": int(size)}


def offload_of(ds: dict, stage: int, problems: list[str]) -> str:
    """zero_optimization.offload_optimizer: {device: cpu} (or the older cpu_offload: true) -> "cpu";
    NVMe and parameter offload refused."""
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    value = zero.get("offload_optimizer")
    device = str(value.get("device", "none") if isinstance(value, dict) else value).lower()
    offload = "cpu" if device == "cpu" or zero.get("cpu_offload") else "none"
    if value is not None and device not in ("none", "cpu"):
        problems.append(f"zero_optimization.offload_optimizer (device {device!r}): pipegrid offloads to the CPU "
                        "only; set device to \"cpu\" or remove it")
    param = zero.get("offload_param")
    param_device = param.get("device", "none") if isinstance(param, dict) else param
    if param is not None and str(param_device).lower() != "none" or zero.get("cpu_offload_params"):
        problems.append(f"zero_optimization.offload_param (device {param_device!r}): pipegrid does not offload "
                        "parameters; remove it")
    if offload == "cpu" and stage == 0:
        problems.append("zero_optimization.offload_optimizer needs zero_optimization.stage >= 1, as in DeepSpeed; "
                        "set stage to 1 or 2")
    return offload


def pipeline_interval(ds: dict, pipe: int, problems: list[str]) -> int:
    """pipeline.activation_checkpoint_interval; the rest of ``pipeline`` and ``activation_checkpointing``
    is accepted when it cannot change results (partitioning is the module's, recompute is torch's)."""
    pipeline = _section(ds, "pipeline", problems)
    _unknown_keys(pipeline, "pipeline", _PIPELINE_KEYS, problems)
    stages = pipeline.get("stages", "auto")
    if stages != "auto" and stages != pipe:
        problems.append(f"pipeline.stages={stages!r} but the pipeline has {pipe} stages; set it to \"auto\" "
                        f"or {pipe}")
    interval = pipeline.get("activation_checkpoint_interval", 0)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        problems.append(f"pipeline.activation_checkpoint_interval must be an integer >= 0, got {interval!r}")
        return 0
    _unknown_keys(_section(ds, "activation_checkpointing", problems), "activation_checkpointing",
                  _CHECKPOINTING_KEYS, problems)
    return interval


def check_top_level(ds: dict, problems: list[str]) -> None:
    """Refuse top-level keys pipegrid does not know, unless they are DeepSpeed defaults or disabled."""
    for key, value in ds.items():
        if key in _HANDLED:
            continue
        if key in _DEFAULT_ONLY:
            if value != _DEFAULT_ONLY[key]:
                problems.append(f"{key}={value!r} is not supported (only DeepSpeed's default "
                                f"{_DEFAULT_ONLY[key]!r}); remove it")
        elif not (isinstance(value, dict) and value.get("enabled") is False):  # a disabled feature is harmless
            problems.append(f"{key} is not a key pipegrid's DeepSpeed adapter knows; remove it (or set "
                            "\"enabled\": false)")


def scalar(ds: dict, key: str, kind: type, default: Any, problems: list[str], minimum: float = 0) -> Any:
    """A top-level scalar of type ``kind`` (ints pass as floats; numbers must be >= ``minimum``)."""
    value = ds.get(key, default)
    if value is None and key == "steps_per_print":  # DeepSpeed: None turns the progress lines off
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    good = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if good and kind is not bool and value < minimum:
        good = False
    if not good:
        bound = f" >= {minimum:g}" if kind is not bool else ""
        problems.append(f"{key} must be a {kind.__name__}{bound}, got {value!r}")
        return default
    return value
