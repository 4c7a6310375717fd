"""compile.*: the config's checks, layers compiled in place (names, tied modules), and the split
backward under compile: weight matmuls stay deferred to W, compiled regions' weights go with I
and say so. One process, backend aot_eager (traced, no code generated: quick)."""

from __future__ import annotations

import logging

import pytest
import torch

from pipegrid.conf.schema import CompileConfig, to_train_config
from pipegrid.pipe.compile import compile_stages, eager_linear_wanted
from pipegrid.pipe.module import PipelineModule
from pipegrid.pipe.split_backward import backward_input, backward_weight
from tests.support.models import cross_entropy, gpt_batches, gpt_layers

AOT = {"enabled": True, "backend": "aot_eager"}


@pytest.mark.parametrize("values,match", [
    ({"mode": "fast"}, "compile.mode must be null or one of default, reduce-overhead"),
    ({"mode": "max-autotune", "backend": "aot_eager"}, "is an inductor setting.*set compile.backend=inductor"),
    ({"fullgraph": True, "eager_linear": True}, "set one of them to false"),
    ({"backend": ""}, "compile.backend must be a backend name"),
])
def test_bad_values_name_the_fix(values, match):
    with pytest.raises(ValueError, match=match):
        to_train_config({"compile": values})


def test_defaults_and_a_good_section():
    assert to_train_config({}).compile == CompileConfig()
    cfg = to_train_config({"compile": {"enabled": True, "mode": "max-autotune-no-cudagraphs", "dynamic": True}})
    assert cfg.compile.enabled and cfg.compile.dynamic is True and cfg.compile.backend == "inductor"
    with pytest.raises(ValueError, match="unknown config key compile.enable; .*did you mean compile.enabled"):
        to_train_config({"compile": {"enable": True}})


@pytest.mark.parametrize("eager_linear,fullgraph,split,want", [
    (None, False, True, True), (None, False, False, False), (None, True, True, False),
    (False, False, True, False), (True, False, False, True)])
def test_eager_linear_resolves_with_the_schedule(eager_linear, fullgraph, split, want):
    assert eager_linear_wanted(CompileConfig(eager_linear=eager_linear, fullgraph=fullgraph), split) is want


def test_unknown_backend_is_refused_when_compiling():
    module = PipelineModule(gpt_layers(1), loss_fn=cross_entropy)
    with pytest.raises(ValueError, match="compile.backend='nonesuch' is not a torch.compile backend here"):
        compile_stages(module, CompileConfig(enabled=True, backend="nonesuch"), split_backward=False)


def test_disabled_compiles_nothing():
    module = PipelineModule(gpt_layers(1), loss_fn=cross_entropy)
    assert compile_stages(module, CompileConfig(), split_backward=True) is None


def _whole_model(compiled: bool, split: bool = False):
    module = PipelineModule(gpt_layers(2), loss_fn=cross_entropy)
    compiler = compile_stages(module, CompileConfig(**AOT), split_backward=split) if compiled else None
    return module, compiler


def test_in_place_keeps_names_and_the_tied_module():
    eager, _ = _whole_model(False)
    module, compiler = _whole_model(True)
    assert list(module.state_dict()) == list(eager.state_dict())
    # 4: take_hidden, a plain function, and 5: nn.LayerNorm, torch's own (dynamo runs it eagerly), stay
    assert compiler.compiled == {0: "Embed", 1: "PositionAndMask", 2: "Block", 3: "Block", 6: "Embed.logits"}
    assert module.stage_module().layers["0"] is module.tied_modules["embed"]  # one module, both positions
    ids, labels = gpt_batches(1)[0]
    for model in (eager, module):
        cross_entropy(model(ids), labels).backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), module.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _split(module, ids, labels):
    stage = module.stage_module()
    embeds = stage.layers["0"](ids).detach().requires_grad_()  # the received activation of a later stage
    x = embeds
    for entry in stage._entries[1:]:
        x = entry.call(x)
    loss = cross_entropy(x, labels)
    params = [p for name, p in stage.named_parameters() if not name.startswith("layers.0.")]
    _, state = backward_input([loss], [None], [embeds], params)
    return state


def test_split_backward_defers_the_linear_weights():
    module, _ = _whole_model(True, split=True)
    state = _split(module, *gpt_batches(1)[0])
    deferred = {id(p) for p in state.deferred_params}
    names = {name: id(p) in deferred for name, p in module.named_parameters() if not name.startswith("stages.0.layers.0")}
    linear = {n for n in names if ".qkv." in n or ".proj." in n or ".mlp." in n}
    assert linear and all(names[n] for n in linear), names  # every weight matmul waits for W
    assert not any(names[n] for n in names if ".ln" in n or n.endswith(".pos"))  # norms go with I
    assert "compiled region" in " ".join(state.early_reasons)
    assert all(p.grad is None for p in state.deferred_params)
    backward_weight(state)
    assert all(p.grad is not None for p in state.deferred_params)


def test_split_backward_without_eager_linear_says_why():
    module = PipelineModule(gpt_layers(1), loss_fn=cross_entropy)
    compile_stages(module, CompileConfig(**AOT, eager_linear=False), split_backward=True)
    state = _split(module, *gpt_batches(1)[0])
    deferred = {id(p) for p in state.deferred_params}
    assert not any(id(p) in deferred for p in module.stage_module().layers["2"].parameters())  # the Block
    assert "compile.eager_linear=true keeps weight matmuls outside it" in " ".join(state.early_reasons)


def test_a_new_shape_is_said_once_per_layer(caplog):
    module, _ = _whole_model(True)
    with caplog.at_level(logging.WARNING, logger="pipegrid"):
        for length in (6, 5, 4):
            ids, labels = gpt_batches(1, seq_len=length)[0]
            cross_entropy(module(ids), labels).backward()
    said = [r.getMessage() for r in caplog.records if "compiles again" in r.getMessage()]
    layers = [m.split(" layer ")[1].split(" ")[0] for m in said]
    assert said and len(layers) == len(set(layers)), said  # at most one line per layer
    assert "compile.dynamic=true" in said[0]


def test_an_eval_under_no_grad_is_said_at_info(caplog):
    module, _ = _whole_model(True)
    ids, labels = gpt_batches(1, seq_len=6)[0]
    cross_entropy(module(ids), labels).backward()
    with caplog.at_level(logging.INFO, logger="pipegrid"), torch.no_grad():
        module(ids)
    said = [r for r in caplog.records if "compiles again" in r.getMessage()]
    assert said and {r.levelno for r in said} == {logging.INFO}, [r.getMessage() for r in said]


def test_hydra_takes_the_section():
    from hydra import compose, initialize_config_module

    from pipegrid.conf.checks import to_app_config
    from pipegrid.conf.store import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="pipegrid.conf"):
        app = to_app_config(compose("gpt", overrides=["compile.enabled=true", "compile.backend=aot_eager"]))
        assert app.compile.enabled and app.compile.backend == "aot_eager"
        with pytest.raises(ValueError, match="compile.mode must be null or one of"):
            to_app_config(compose("gpt", overrides=["compile.mode=fastest"]))


def test_transformers_layers_compile_once_for_every_index(caplog):
    """pipegrid.hf compiles the transformers layer inside each DecoderLayer: one compile serves all
    indices. Compiling the wrapper, which reads its own ``index``, compiled each layer again, and
    past torch._dynamo's recompile_limit (8) the rest ran eagerly."""
    pytest.importorskip("transformers")
    from pipegrid import hf
    from tests.support.hf_models import lm_batches, tiny_config

    torch.manual_seed(0)
    eager = hf.from_config(tiny_config("llama", n_layer=10))
    module = hf.from_config(tiny_config("llama", n_layer=10))
    module.load_state_dict(eager.state_dict())
    compile_stages(module, CompileConfig(**AOT), split_backward=False)
    ids, labels = lm_batches(1)[0]
    with caplog.at_level(logging.WARNING, logger="pipegrid"):
        out = module(ids)
    assert not [r.getMessage() for r in caplog.records if "compiles again" in r.getMessage()]
    decoders = [m for m in module.modules() if type(m).__name__ == "DecoderLayer"]
    assert len(decoders) == 10 and all(d.layer._compiled_call_impl is not None for d in decoders)
    torch.testing.assert_close(out, eager(ids), rtol=1e-6, atol=1e-6)
