"""ds_config.json -> TrainConfig: every key pipegrid honours translates with DeepSpeed 0.19's meaning,
and every key it cannot honour is named, with its fix, in one error raised before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pipegrid.compat.deepspeed import from_config as fd
from pipegrid.compat.deepspeed.from_config import DeepSpeedConfigError, batch_sizes, from_deepspeed, translate
from pipegrid.conf.schema import to_train_config

REPO = Path(__file__).resolve().parents[2]

BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
SCHEDULES = "pipegrid.compat.deepspeed.runtime.lr_schedules"


def tr(world_size: int = 2, pipe: int = 2, **keys):
    return translate({**BASE, **keys}, world_size=world_size, pipe=pipe)


def refused(ds: dict, world_size: int = 2, pipe: int = 2) -> list[str]:
    with pytest.raises(DeepSpeedConfigError) as info:
        translate(ds, world_size=world_size, pipe=pipe)
    return info.value.problems


# --- the batch trio -------------------------------------------------------------------
@pytest.mark.parametrize("given,data,expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),       # accumulation derived
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 2, (32, 8, 2)),          # micro-batch derived
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ({"train_batch_size": 32}, 4, (32, 8, 1)),                                           # one accumulation step
    ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),
    ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8}, 1, (256, 8, 32)),   # DeepSpeedExamples' config
])
def test_batch_trio_follows_deepspeeds_derivation(given, data, expected):
    assert batch_sizes(given, data) == expected


@pytest.mark.parametrize("given,data,message", [
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}, 2,
     "30 != 4 x 4 x 2"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2, "30 != 4 x 3 x 2"),  # 30 // 4 // 2 = 3
    ({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4}, 2, "gradient_accumulation_steps must be > 0"),
    ({"gradient_accumulation_steps": 4}, 2, "either train_batch_size or train_micro_batch_size_per_gpu"),
    ({}, 1, "either train_batch_size or train_micro_batch_size_per_gpu"),
    ({"train_batch_size": "32"}, 1, "train_batch_size must be an integer"),
])
def test_batch_trio_inconsistent_is_refused(given, data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batch_sizes(given, data)


def test_trio_sets_micro_batches_and_the_topology_explicitly():
    t = translate({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, world_size=4, pipe=2)
    cfg = t.config
    assert (cfg.topology.pipe, cfg.topology.data, cfg.topology.tensor) == (2, 2, 1)
    assert (cfg.schedule.name, cfg.schedule.micro_batches, cfg.schedule.virtual_stages) == ("1f1b", 4, 1)
    assert (t.train_batch_size, t.micro_batch_size, t.gradient_accumulation_steps) == (64, 8, 4)


# --- optimizer ---------------------------------------------------------------------------
FUSED = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


@pytest.mark.parametrize("section,expected", [
    ({"type": "Adam"}, {"_target_": "torch.optim.AdamW", **FUSED}),   # adam_w_mode defaults to true: decoupled decay
    ({"type": "adam", "params": {"lr": 0.1, "weight_decay": 0.01}},
     {"_target_": "torch.optim.AdamW", **FUSED, "lr": 0.1, "weight_decay": 0.01}),
    ({"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.01}},
     {"_target_": "torch.optim.Adam", **FUSED, "weight_decay": 0.01}),  # L2 penalty, as FusedAdam's mode 0
    ({"type": "AdamW", "params": {"adam_w_mode": False}}, {"_target_": "torch.optim.AdamW", **FUSED}),
    ({"type": "ADAMW", "params": {"betas": [0.8, 0.9], "eps": 1e-6, "set_grad_none": False}},
     {"_target_": "torch.optim.AdamW", **FUSED, "betas": [0.8, 0.9], "eps": 1e-6}),
    ({"type": "Adam", "params": {"torch_adam": True, "lr": 0.1}},        # torch's class and torch's defaults
     {"_target_": "torch.optim.AdamW", "lr": 0.1, "foreach": None}),
    ({"type": "Adam", "params": {"torch_adam": True, "adam_w_mode": False, "foreach": True}},
     {"_target_": "torch.optim.Adam", "foreach": True}),
    ({"type": "Adam", "params": {"fp32_optimizer_states": True}}, {"_target_": "torch.optim.AdamW", **FUSED}),
    ({"type": "Adagrad", "params": {"lr": 0.1}}, {"_target_": "torch.optim.Adagrad", "lr": 0.1}),
    ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
     {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}),
    ({"type": "RMSprop", "params": {"lr": 0.01}}, {"_target_": "torch.optim.RMSprop", "lr": 0.01}),
])
def test_optimizer_types_and_defaults(section, expected):
    assert tr(optimizer=section).config.optimizer == expected


def test_no_optimizer_is_a_placeholder_that_the_adapter_refuses_to_train():
    t = tr()
    assert not t.has_optimizer and t.config.optimizer == {"_target_": "torch.optim.SGD", "lr": 0.0}


@pytest.mark.parametrize("section,fragment", [
    ({"type": "Lamb"}, "FusedLamb"), ({"type": "OneBitAdam"}, "1-bit Adam"), ({"type": "Lion"}, "FusedLion"),
    ({"type": "Muon"}, "MuonWithAuxAdam"), ({"type": "MuAdam"}, "mup"),
    ({"type": "sgd"}, "neither a DeepSpeed optimizer nor a torch.optim class"),  # torch names are case-sensitive
    ({"type": "Adam", "params": {"max_grad_norm": 1.0}}, "gradient_clipping"),
    ({"type": "Adam", "params": {"momentum": 0.9}}, "not arguments of DeepSpeed's FusedAdam"),
    ({"type": "Adam", "params": {"amsgrad": True}}, "amsgrad"),
    ({"type": "Adam", "params": {"bias_correction": False}}, "bias_correction"),
    ({"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}, "not arguments of torch.optim.SGD"),
    ({"type": "SGD", "legacy_fusion": True}, "legacy_fusion"),
    ({"params": {"lr": 1}}, "optimizer must be"),
])
def test_optimizers_pipegrid_cannot_build_are_refused(section, fragment):
    problems = refused({**BASE, "optimizer": section})
    assert any(fragment in p for p in problems), problems


def test_zero_refuses_untested_optimizers_unless_allowed():
    ds = {**BASE, "zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    assert any("zero_allow_untested_optimizer" in p for p in refused(ds))
    allowed = translate({**ds, "zero_allow_untested_optimizer": True}, world_size=2, pipe=2)
    assert allowed.config.zero.stage == 1 and allowed.config.optimizer["_target_"] == "torch.optim.SGD"
    tested = translate({**ds, "optimizer": {"type": "Adagrad"}}, world_size=2, pipe=2)
    assert tested.config.optimizer["_target_"] == "torch.optim.Adagrad"


# --- scheduler ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("WarmupLR", {"warmup_num_steps": 10}), ("WarmupDecayLR", {"total_num_steps": 100}),
    ("WarmupCosineLR", {"total_num_steps": 100, "cos_min_ratio": 0.1}),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}), ("LRRangeTest", {}),
])
def test_deepspeed_schedules_become_their_torch_schedulers(name, params):
    spec = tr(scheduler={"type": name, "params": params}).config.lr_scheduler
    assert spec == {"_target_": f"{SCHEDULES}.{name}", **params}


def test_torch_schedulers_pass_through_as_on_deepspeed():
    spec = tr(scheduler={"type": "StepLR", "params": {"step_size": 3, "gamma": 0.5}}).config.lr_scheduler
    assert spec == {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 3, "gamma": 0.5}


@pytest.mark.parametrize("section,fragment", [
    ({"type": "WarmupDecayLR", "params": {}}, "missing ['total_num_steps']"),
    ({"type": "WarmupLR", "params": {"warmup_steps": 3}}, "unknown ['warmup_steps']"),
    ({"type": "WarmupLR", "params": {"last_batch_iteration": 5}}, "last_batch_iteration"),
    ({"type": "Cosine"}, "neither a DeepSpeed schedule"),
    ({"type": "StepLR", "params": {"step_size": 3, "warmup": 1}}, "not arguments of torch.optim.lr_scheduler.StepLR"),
])
def test_bad_schedules_are_refused(section, fragment):
    assert any(fragment in p for p in refused({**BASE, "scheduler": section}))


# --- precision ---------------------------------------------------------------------------
def test_fp16_without_zero_has_deepspeeds_fp16_optimizer_rule():
    t = tr(fp16={"enabled": True, "initial_scale_power": 12, "loss_scale_window": 50, "hysteresis": 4,
                 "min_loss_scale": 2, "auto_cast": True})
    p = t.config.precision
    assert (p.dtype, p.initial_loss_scale, p.growth_interval, p.backoff_factor, p.min_loss_scale) == \
        ("float16", 4096.0, 50, 0.5, 2.0)
    assert p.hysteresis == 1  # FP16_Optimizer ignores fp16.hysteresis
    assert t.loss_scaler == {"dynamic": True, "init_scale": 4096.0, "scale_window": 50, "min_scale": 2.0,
                             "delayed_shift": 1, "consecutive_hysteresis": False, "raise_error_at_min_scale": False}


def test_fp16_with_zero1_keeps_hysteresis_and_raises_at_the_minimum():
    t = tr(fp16={"enabled": True, "consecutive_hysteresis": True}, zero_optimization={"stage": 1},
           optimizer={"type": "Adam"})
    assert t.loss_scaler == {"dynamic": True, "init_scale": 2.0 ** 16, "scale_window": 1000, "min_scale": 1.0,
                             "delayed_shift": 2, "consecutive_hysteresis": True, "raise_error_at_min_scale": True}
    assert t.config.precision.hysteresis == 2


def test_fp16_static_loss_scale():
    t = tr(fp16={"enabled": True, "loss_scale": 128})
    assert t.loss_scaler["dynamic"] is False and t.loss_scaler["init_scale"] == 128.0


@pytest.mark.parametrize("key", ["bf16", "bfloat16"])
def test_bf16_and_its_overflow_check(key):
    on = tr(**{key: {"enabled": True, "immediate_grad_update": True}})
    assert on.config.precision.dtype == "bfloat16" and on.config.train.on_nonfinite == "skip"
    assert any("fp32" in note for note in on.notes)  # ZeRO-0 accumulates in fp32 on DeepSpeed: said
    off = tr(**{key: {"enabled": True, "check_grad_overflow": False}})
    assert off.config.train.on_nonfinite == "raise"


def test_fp32_is_the_default_and_disabled_sections_are_fine():
    t = tr(fp16={"enabled": False}, bf16={"enabled": False}, tensorboard={"enabled": False},
           flops_profiler={"enabled": False})
    assert t.config.precision.dtype == "float32" and t.loss_scaler is None


@pytest.mark.parametrize("ds,fragment", [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both enabled"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, "fp16_master_weights_and_grads"),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}}, "loss_scale_window >= 1"),
    ({"fp16": {"enabled": True, "initial_scale_power": "high"}}, "must be numbers"),
    ({"fp16": {"enabled": True, "scale": 2}}, "fp16 keys ['scale']"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "bf16_master_weights_and_grads"),
    ({"bf16": {"enabled": True, "bf16_optimizer_states": True}}, "bf16_optimizer_states"),
    ({"bf16": True}, "bf16 must be a JSON object"),
])
def test_precision_pipegrid_cannot_honour_is_refused(ds, fragment):
    assert any(fragment in p for p in refused({**BASE, **ds}))


# --- ZeRO, pipeline, the rest ------------------------------------------------------------------
def test_zero_stage_and_its_bucket_knobs():
    t = tr(zero_optimization={"stage": 1, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
                              "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                              "offload_optimizer": {"device": "none"}}, optimizer={"type": "AdamW"})
    assert t.config.zero.stage == 1 and t.config.zero.offload_optimizer == "none"
    assert tr(zero_optimization={"stage": 0}).config.zero.stage == 0


def test_reduce_bucket_size_sets_zero_bucket_elements():
    t = tr(zero_optimization={"stage": 2, "reduce_bucket_size": 5e7}, optimizer={"type": "AdamW"})
    assert t.config.zero.bucket_elements == 50_000_000
    assert any("zero.reduce_every_micro_batch=true" in note for note in t.notes)  # pipegrid's default differs: said
    assert tr(zero_optimization={"stage": 2}, optimizer={"type": "AdamW"}).config.zero.bucket_elements == 1 << 24
    bad = {**BASE, "zero_optimization": {"stage": 2, "reduce_bucket_size": 0.5}}
    assert any("reduce_bucket_size" in p for p in refused(bad))


@pytest.mark.parametrize("zero", [{"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                                  {"stage": 1, "cpu_offload": True},
                                  {"stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": 5e7}])
def test_zero2_zero3_and_cpu_offload_are_accepted(zero):
    t = tr(zero_optimization=zero, optimizer={"type": "AdamW"})
    assert t.config.zero.stage == zero["stage"] and t.config.zero.offload_optimizer == "cpu"


@pytest.mark.parametrize("zero,fragment", [
    ({"stage": 4}, "must be 0, 1, 2 or 3"),
    ({"stage": 1, "offload_optimizer": {"device": "nvme"}}, "offload_optimizer (device 'nvme')"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "needs zero_optimization.stage >= 1"),
    ({"stage": 1, "offload_param": {"device": "nvme"}}, "offload_param (device 'nvme')"),
    ({"stage": 1, "cpu_offload_params": True}, "offload_param"),
    ({"stage": 1, "zero_quantized_weights": True}, "zero_quantized_weights"),
])
def test_zero_pipegrid_cannot_honour_is_refused(zero, fragment):
    ds = {**BASE, "zero_optimization": zero, "optimizer": {"type": "Adam"}}
    assert any(fragment in p for p in refused(ds)), refused(ds)


def test_pipeline_and_activation_checkpointing_keys():
    t = tr(pipeline={"stages": 2, "partition": "parameters", "seed_layers": True, "activation_checkpoint_interval": 3,
                     "pipe_partitioned": False, "grad_partitioned": False, "use_reentrant": False},
           activation_checkpointing={"partition_activations": True, "cpu_checkpointing": True,
                                     "contiguous_memory_optimization": False, "number_checkpoints": 4,
                                     "synchronize_checkpoint_boundary": False, "profile": False})
    assert t.activation_checkpoint_interval == 3
    assert tr(pipeline={"stages": "auto"}).activation_checkpoint_interval == 0


@pytest.mark.parametrize("ds,fragment", [
    ({"pipeline": {"stages": 4}}, "pipeline.stages=4 but the pipeline has 2 stages"),
    ({"pipeline": {"activation_checkpoint_interval": -1}}, "activation_checkpoint_interval must be"),
    ({"pipeline": {"micro_batches": 8}}, "pipeline keys ['micro_batches']"),
    ({"activation_checkpointing": {"partition_activation": True}}, "activation_checkpointing keys"),
])
def test_pipeline_keys_pipegrid_cannot_honour_are_refused(ds, fragment):
    assert any(fragment in p for p in refused({**BASE, **ds}))


def test_logging_clipping_and_loader_keys():
    t = tr(gradient_clipping=1, steps_per_print=5, wall_clock_breakdown=True, memory_breakdown=True,
           dataloader_drop_last=True, zero_force_ds_cpu_optimizer=False, prescale_gradients=False,
           gradient_predivide_factor=1.0, sparse_gradients=False)
    assert t.config.train.grad_clip == 1.0 and t.config.train.log_interval == 5 and t.config.trace.enabled
    assert (t.steps_per_print, t.wall_clock_breakdown, t.memory_breakdown, t.dataloader_drop_last) == \
        (5, True, True, True)
    assert tr(steps_per_print=None).steps_per_print is None  # DeepSpeed: no progress lines


@pytest.mark.parametrize("ds,fragment", [
    ({"tensorboard": {"enabled": True}}, "tensorboard is not a key"),
    ({"amp": {"enabled": True}}, "amp is not a key"),
    ({"seed": 1}, "seed is not a key"),
    ({"prescale_gradients": True}, "prescale_gradients=True"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping must be a float"),
    ({"gradient_clipping": -1}, "gradient_clipping must be a float >= 0"),
    ({"steps_per_print": 0}, "steps_per_print must be a int >= 1"),
    ({"wall_clock_breakdown": "yes"}, "wall_clock_breakdown must be a bool"),
    ({"pipegrid": {"schedule": {"name": "bogus"}}}, "schedule.name must be one of"),
    ({"pipegrid": ["x"]}, "pipegrid (native overrides) must be a JSON object"),
])
def test_other_keys_pipegrid_cannot_honour_are_refused(ds, fragment):
    assert any(fragment in p for p in refused({**BASE, **ds})), refused({**BASE, **ds})


def test_one_error_lists_every_problem_before_anything_starts():
    ds = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "zero_optimization": {"stage": 4, "offload_optimizer": {"device": "nvme"}}, "optimizer": {"type": "Lamb"},
          "scheduler": {"type": "Foo"}, "tensorboard": {"enabled": True}, "fp16": {"enabled": True},
          "bf16": {"enabled": True}}
    with pytest.raises(DeepSpeedConfigError) as info:
        translate(ds, world_size=2, pipe=2)
    text = str(info.value)
    assert text.startswith("7 setting(s) of the DeepSpeed config cannot run on pipegrid")
    for fragment in ("tensorboard", "10 != 4 x 2 x 1", "must be 0, 1, 2 or 3", "offload_optimizer", "Lamb", "'Foo'", "both enabled"):
        assert fragment in text


def test_native_overrides_pick_pipegrid_schedules():
    t = tr(pipegrid={"schedule": {"name": "zb_h1", "coalesce": 2}, "comm": {"timeout_s": 30}})
    assert (t.config.schedule.name, t.config.schedule.coalesce, t.config.schedule.micro_batches) == ("zb_h1", 2, 4)
    assert t.config.comm.timeout_s == 30


def test_world_size_must_hold_the_pipeline():
    with pytest.raises(ValueError, match="world size 3 is not a multiple of pipe 2"):
        translate(BASE, world_size=3, pipe=2)


# --- from_deepspeed, the CLI and its overrides --------------------------------------------
DS_EXAMPLE = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8,
              "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
              "gradient_clipping": 1.0, "steps_per_print": 10, "wall_clock_breakdown": False}


def test_from_deepspeed_reads_a_json_file(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(DS_EXAMPLE))
    cfg = from_deepspeed(path, world_size=2, pipe=2)
    assert cfg == from_deepspeed(DS_EXAMPLE, world_size=2, pipe=2)
    assert cfg.schedule.micro_batches == 32 and cfg.optimizer["_target_"] == "torch.optim.AdamW"
    with pytest.raises(ValueError, match="cannot read DeepSpeed config"):
        from_deepspeed(tmp_path / "missing.json", world_size=2)


def test_cli_prints_overrides_yaml_and_notes(tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(DS_EXAMPLE))
    assert fd.main([str(path), "--world-size", "2", "--pipe", "2"]) == 0
    out = capsys.readouterr().out
    yaml_text = out.split("# YAML")[1].split("# Notes:")[0].split("\n", 1)[1]
    assert to_train_config(OmegaConf.to_container(OmegaConf.create(yaml_text))) == \
        from_deepspeed(DS_EXAMPLE, world_size=2, pipe=2)  # the YAML is the whole translation
    assert "micro-batches of 8 samples per data rank" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DS_EXAMPLE, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    assert fd.main([str(bad), "--world-size", "2"]) == 2
    assert "zero_optimization.offload_param" in capsys.readouterr().err


@pytest.mark.parametrize("app_name", ["gpt", "mlp"])  # gpt has an lr_scheduler preset, mlp none
@pytest.mark.parametrize("scheduler", [None, {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}])
def test_overrides_compose_onto_pipegrids_packaged_app(app_name, scheduler):
    from pipegrid.conf.store import register_configs

    ds_config = {**{k: v for k, v in DS_EXAMPLE.items() if k != "scheduler"},
                 **({"scheduler": scheduler} if scheduler else {})}
    translation = translate(ds_config, world_size=2, pipe=2)
    overrides = [o.strip("'") for o in fd.to_overrides(translation)]
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="pipegrid.conf"):
        app = OmegaConf.to_object(compose(app_name, overrides=overrides))
    want = translation.config
    for section in ("topology", "schedule", "zero", "precision"):
        assert getattr(app, section) == getattr(want, section)
    assert app.optimizer == want.optimizer and app.lr_scheduler == want.lr_scheduler  # replaced, not merged
    assert (app.lr_scheduler is None) == (scheduler is None)
    assert app.train.grad_clip == want.train.grad_clip
