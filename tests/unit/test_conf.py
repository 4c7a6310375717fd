"""Hydra configuration: every preset composes onto the schema; typos, wrong types, keys
added with '+' and cross-section mistakes fail before any process starts, naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import pipegrid.conf
from pipegrid.conf.apps import GPTAppConfig, MLPAppConfig
from pipegrid.conf.checks import to_app_config
from pipegrid.conf.schema import ZeroConfig, to_train_config
from pipegrid.conf.store import register_configs
from pipegrid.schedules import ScheduleError

CONF_DIR = Path(pipegrid.conf.__file__).parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="pipegrid.conf"):
        yield


def _app(overrides: list[str] = (), name: str = "gpt", world_size: int | None = None):
    return to_app_config(compose(name, overrides=list(overrides)), world_size=world_size)


def test_groups_ship_the_promised_presets():
    assert _options("schedule") == ["1f1b", "dualpipev", "gpipe", "interleaved_1f1b", "zb_h1", "zb_v"]
    assert {"gpt_tiny", "gpt_small", "mlp"} <= set(_options("model"))
    assert _options("optimizer") == ["adamw", "sgd"]
    assert _options("precision") == ["bf16", "fp16", "fp32"]
    assert {"single", "pipe2", "pipe4", "pipe2_data2"} <= set(_options("topology"))


def test_defaults_compose_to_the_app_dataclasses():
    gpt, mlp = _app(), _app(name="mlp")
    assert isinstance(gpt, GPTAppConfig) and isinstance(mlp, MLPAppConfig)
    assert (gpt.topology.pipe, gpt.topology.data, gpt.topology.tensor) == (2, 1, 1)  # the main job: pipe=2
    assert gpt.lr_scheduler["T_max"] == gpt.train.steps  # interpolations resolved
    assert gpt.optimizer["_target_"] == "torch.optim.AdamW"


def _assert_preset_applied(app, group: str, option: str) -> None:
    """Every key of the preset's YAML reached the checked app with the YAML's value."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    section = getattr(app, group)
    got = section if isinstance(section, dict) else vars(section)  # optimizer is free-form
    assert preset and {key: got[key] for key in preset} == preset, (group, option, got)


@pytest.mark.parametrize("schedule", _options("schedule"))
@pytest.mark.parametrize("topology", _options("topology"))
def test_every_schedule_and_topology_preset(schedule, topology):
    app = _app([f"schedule={schedule}", f"topology={topology}"])
    _assert_preset_applied(app, "schedule", schedule)
    _assert_preset_applied(app, "topology", topology)
    assert all(app.is_set(f"topology.{axis}") for axis in ("pipe", "data", "tensor"))  # a preset sets the grid


@pytest.mark.parametrize("group,option", [("model", "gpt_small"), ("model", "gpt_tiny"), ("optimizer", "sgd"),
                                          ("optimizer", "adamw"), ("precision", "bf16"), ("precision", "fp16"),
                                          ("precision", "fp32")])
def test_every_other_preset(group, option):
    app = _app([f"{group}={option}"])
    _assert_preset_applied(app, group, option)
    if group == "optimizer":  # a chosen optimizer replaces the default, keeps none of its keys
        assert set(app.optimizer) == set(OmegaConf.load(CONF_DIR / "optimizer" / f"{option}.yaml"))


def test_mlp_presets():
    assert _app(["model=mlp", "topology=pipe4"], name="mlp").model.depth == 4


def test_typo_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="Could not override 'topology.pipee'"):
        compose("gpt", overrides=["topology.pipee=2"])


def test_wrong_type_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="topology.pipe=two") as info:
        compose("gpt", overrides=["topology.pipe=two"])
    assert "could not be converted to Integer" in str(info.value.__cause__)


def test_model_preset_of_another_app_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="model/mlp"):
        compose("gpt", overrides=["model=mlp"])


@pytest.mark.parametrize("override,key", [("+topology.foo=1", "topology.foo"), ("+foo=1", "foo"),
                                          ("++model.n_layers=3", "model.n_layers")])
def test_keys_added_with_plus_are_refused(override, key):
    with pytest.raises(ValueError, match=rf"unknown config key '{key}' \(added with '\+'\?\)"):
        _app([override])


def test_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match=r"optimizer keys \['momentun'\] are not arguments of torch.optim.SGD"):
        _app(["optimizer=sgd", "+optimizer.momentun=0.9"])


def test_value_checks_of_the_schema_run():
    with pytest.raises(ValueError, match="schedule.name must be one of"):
        _app(["schedule.name=pipedream"])


@pytest.mark.parametrize("override,match", [("precision.backoff_factor=2", r"backoff_factor must be in \(0, 1\)"),
                                            ("kernels.backend=cuda", "kernels.backend must be one of")])
def test_values_hydra_lets_through_fail_in_the_schema(override, match):
    with pytest.raises(ValueError, match=match):
        _app(["precision=fp16", override])


def test_world_size_must_match_the_topology():
    with pytest.raises(ValueError, match=r"topology needs 4 processes \(pipe=2 x data=2 x tensor=1\), got "
                                         r"WORLD_SIZE=8; change topology"):
        _app(["topology=pipe2_data2"], world_size=8)
    assert _app(["topology=pipe4_data2"], world_size=8).topology.data == 2


def test_schedule_must_accept_the_micro_batches():
    with pytest.raises(ScheduleError, match=r"interleaved_1f1b.*topology.pipe=4.*micro_batches=6.*set "
                                            r"micro_batches=8"):
        _app(["topology=pipe4", "schedule=interleaved_1f1b", "schedule.micro_batches=6"])


@pytest.mark.parametrize("override,key,fix", [("model.n_head=3", "n_head", 4),
                                              ("model.vocab_size=103", "vocab_size", 104)])
def test_tensor_parallel_splits_must_divide(override, key, fix):
    extra = ["model.n_embd=96"] if key == "n_head" else []
    with pytest.raises(ValueError, match=rf"model.{key} over topology.tensor=2 .* set model.{key}={fix}"):
        _app(["topology=pipe2_tensor2", override, *extra])


def test_stages_need_layers():
    with pytest.raises(ValueError, match="raise model.n_layer or use fewer stages"):
        _app(["topology=pipe4", "schedule=interleaved_1f1b", "model.n_layer=2"])


@pytest.mark.parametrize("size", [1, 3])
def test_the_layer_count_checked_is_the_example_models_own(size):
    """check_layout cuts by model.pipeline_layers(): it must be what the example model lists."""
    from examples.models.gpt import GPT, GPTConfig
    from examples.train_mlp import mlp
    from pipegrid.conf.apps import GPTModelConfig, MLPModelConfig

    import pipegrid as pg

    gpt = GPTModelConfig(vocab_size=8, seq_len=4, n_layer=size, n_head=1, n_embd=4)
    assert gpt.pipeline_layers() == GPT(GPTConfig(**vars(gpt)), pipe=1).num_layers
    app = MLPAppConfig(model=MLPModelConfig(in_features=2, width=2, depth=size))
    assert app.model.pipeline_layers() == mlp(app, pg.Topology()).num_layers
    with pytest.raises(ValueError, match=rf"the model has {size + 2} pipeline layers .* raise model.depth"):
        to_app_config({"topology": {"pipe": size + 3}, "model": {"depth": size}}, MLPAppConfig)


def test_mlp_refuses_tensor_parallelism():
    with pytest.raises(ValueError, match="set topology.tensor=1"):
        _app(["topology=pipe2_tensor2"], name="mlp")


def test_plain_dicts_are_checked_too():
    app = to_app_config({"topology": {"pipe": 2}, "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}},
                        GPTAppConfig)
    assert app.optimizer == {"_target_": "torch.optim.SGD", "lr": 0.1}
    with pytest.raises(ValueError, match="unknown config key 'model.width'"):
        to_app_config({"model": {"width": 3}}, GPTAppConfig)


def test_a_command_line_lr_scheduler_merges_into_an_app_that_has_none():
    """OmegaConf could not merge `lr_scheduler={...}` into a dict field left null (mlp.yaml)."""
    app = _app(["lr_scheduler={_target_:torch.optim.lr_scheduler.StepLR,step_size:1}"], name="mlp")
    assert app.lr_scheduler == {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1}
    with pytest.raises(TypeError, match="lr_scheduler must be a mapping with a _target_ .*got int 5"):
        to_train_config({"lr_scheduler": 5})


@pytest.mark.parametrize("zero,fragment", [
    ({"stage": 4}, "must be 0, 1, 2 or 3"),
    ({"stage": 1, "reduce_every_micro_batch": True}, "needs zero.stage=2"),
    ({"stage": 0, "offload_optimizer": "cpu"}, "set zero.stage=1"),
    ({"stage": 1, "offload_optimizer": "nvme"}, "must be none or cpu"),
    ({"stage": 2, "gather": "per_layer"}, "needs zero.stage=3, got zero.stage=2; set zero.stage=3"),
    ({"stage": 3, "gather": "per_micro_batch"}, "must be per_step or per_layer"),
])
def test_zero_combinations_that_cannot_work_are_refused_with_the_fix(zero, fragment):
    with pytest.raises(ValueError, match=fragment):
        ZeroConfig(**zero)


def test_a_fused_loss_is_refused_where_per_layer_gathering_frees_the_head_first():
    with pytest.raises(ValueError, match="set loss.chunked=auto .* or zero.gather=per_step"):
        to_train_config({"zero": {"stage": 3, "gather": "per_layer"}, "loss": {"chunked": True},
                         "topology": {"data": 2}})
    assert to_train_config({"zero": {"stage": 3, "gather": "per_layer"}, "topology": {"data": 2}}).loss.chunked == "auto"
