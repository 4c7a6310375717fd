"""pipegrid.hf in one process: stages built one by one and chained by hand equal each
family's own transformers forward; a stage reads and materialises only its own tensors;
from_config starts identical in every layout, initialised as transformers does; saved
directories load in transformers; bad input fails before anything distributed starts."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import pipegrid as pg
from pipegrid import hf
from pipegrid.hf.tp_plan import ShardRule
from pipegrid.hf.weights import CheckpointWeights
from tests.support.hf_models import (ATTN, SWEEP, lm_batches, load_reference, save_config, save_tiny, sweep_config,
                                     tiny_config)

# Bloom declares no plan: the one a user passes (what the refusal asks for) must work too
BLOOM_PLAN = {"word_embeddings": (["input_ids"], ["inputs_embeds"]),
              "word_embeddings_layernorm": (["inputs_embeds"], ["hidden_states"]),
              "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
              "ln_f": (["hidden_states"], ["hidden_states"])}


def stages(build, p: int) -> list:
    return [build(pipe=p, pipe_rank=r).eval() for r in range(p)]


@torch.no_grad()
def chained(modules: list, x):
    for module in modules:
        x = module(x)
    return x


def stored_keys(directory: str) -> set[str]:
    return set(CheckpointWeights(directory).tensors)


@pytest.mark.parametrize("family", [*SWEEP, "bloom"])
def test_stages_chained_equal_the_familys_own_forward(family, tmp_path):
    directory = save_config(sweep_config(family), str(tmp_path / family))
    reference = load_reference(directory).eval()
    plan = {"pp_plan": BLOOM_PLAN} if family == "bloom" else {}
    (ids, mask), _ = lm_batches(1, seq_len=7, padded=True)[0]
    with torch.no_grad():
        want = {False: reference(input_ids=ids).logits, True: reference(input_ids=ids, attention_mask=mask).logits}
    for p in (1, 2, 3):
        modules = stages(lambda **kw: hf.from_pretrained(directory, attn_implementation=ATTN, **plan, **kw), p)
        for padded, x in ((False, ids), (True, (ids, mask))):
            torch.testing.assert_close(chained(modules, x), want[padded], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{family} pipe={p} padded={padded}: {m}")


def test_a_stage_reads_and_materialises_only_its_own_tensors(tmp_path, monkeypatch):
    directory = save_tiny("llama", str(tmp_path / "llama"), n_layer=4)
    read: list[str] = []
    original = CheckpointWeights.read_into
    monkeypatch.setattr(CheckpointWeights, "read_into", lambda self, t, key, shard=None: (read.append(key), original(self, t, key, shard)))
    everything = set()
    for r in range(3):
        read.clear()
        model = hf.from_pretrained(directory, pipe=3, pipe_rank=r)
        own = set(model.hf_state_dict())
        assert set(read) == own and len(read) == len(own), f"stage {r} read {sorted(set(read) - own)} besides its own"
        assert {k for k, _ in model.hf_shard_keys()[r]} == own
        meta = {name for name, t in model.skeleton.shell.state_dict().items() if t.is_meta}
        assert meta == set(model.skeleton.shell.state_dict()) - own, f"stage {r} materialised another stage's tensor"
        everything |= own
    assert everything == stored_keys(directory)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_from_config_starts_identical_in_every_layout(family):
    config = tiny_config(family, n_layer=3)
    whole = hf.from_config(config, seed=7).hf_state_dict()
    for p, method in ((2, "parameters"), (3, "uniform"), (4, "type:DecoderLayer|Block")):
        union = {}
        for module in stages(lambda **kw: hf.from_config(config, seed=7, partition_method=method, **kw), p):
            union.update(module.hf_state_dict())
        assert union.keys() == whole.keys()
        for key, tensor in whole.items():
            assert torch.equal(union[key], tensor), f"{family} pipe={p}: {key} starts differently"
    other_seed = hf.from_config(config, seed=8).hf_state_dict()
    assert not all(torch.equal(other_seed[k], t) for k, t in whole.items())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_from_config_initialises_as_transformers_does(family):
    config = tiny_config(family, n_layer=2) if family != "gemma" else sweep_config("gemma", hidden_size=32)
    ours = hf.from_config(config).hf_state_dict()
    torch.manual_seed(0)
    theirs = load_reference_from_config(config).state_dict()
    for key, tensor in ours.items():
        expected = theirs[key]
        if torch.all(expected == expected.flatten()[0]):  # ones, zeros: exactly
            assert torch.equal(tensor, expected), key
        else:  # random: the same spread (GPT-2 scales its residual projections by 1/sqrt(2 n_layer))
            ratio = (tensor.float().std() / expected.float().std()).item()
            assert 0.75 < ratio < 1.33, f"{key}: std {tensor.std():.4f}, transformers gives {expected.std():.4f}"


def load_reference_from_config(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)


def test_from_config_round_trips_through_save_pretrained(tmp_path):
    model = hf.from_config(tiny_config("llama"), attn_implementation=ATTN).eval()
    out = hf.save_pretrained(model, str(tmp_path / "saved"))
    (ids, mask), _ = lm_batches(1, padded=True)[0]
    with torch.no_grad():
        want = model((ids, mask))
        got = load_reference(out).eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_save_keeps_the_names_transformers_stores(tmp_path):
    directory = save_config(sweep_config("gpt_neox"), str(tmp_path / "neox"))  # stores embed_out, not lm_head
    out = hf.save_pretrained(hf.from_pretrained(directory), str(tmp_path / "again"))
    assert stored_keys(out) == stored_keys(directory) and "embed_out.weight" in stored_keys(out)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == stored_keys(out)
    ids, _ = lm_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(load_reference(out)(input_ids=ids).logits,
                                   load_reference(directory)(input_ids=ids).logits, rtol=0, atol=0)


def test_expert_weights_transformers_stacks_while_loading_round_trip(tmp_path):
    config = sweep_config("mixtral", num_local_experts=4, num_experts_per_tok=2)
    directory = save_config(config, str(tmp_path / "moe"))  # stores experts.E.w1/w2/w3 one by one
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored_keys(directory)
    modules = stages(lambda **kw: hf.from_pretrained(directory, attn_implementation=ATTN, **kw), 2)
    ids, _ = lm_batches(1)[0]
    with torch.no_grad():
        want = load_reference(directory).eval()(input_ids=ids).logits
    torch.testing.assert_close(chained(modules, ids), want, rtol=1e-5, atol=1e-6)
    out = hf.save_pretrained(hf.from_pretrained(directory), str(tmp_path / "again"))
    assert stored_keys(out) == stored_keys(directory)
    with torch.no_grad():
        torch.testing.assert_close(load_reference(out).eval()(input_ids=ids).logits, want, rtol=0, atol=0)


def test_tied_embedding_is_stored_once(tmp_path):
    directory = save_tiny("gpt2", str(tmp_path / "gpt2"))
    out = hf.save_pretrained(hf.from_pretrained(directory), str(tmp_path / "saved"))
    with safe_open(os.path.join(out, "model-00001-of-00001.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["GPT2LMHeadModel"]


# ---- bad input: clear errors, raised before any process group exists -------------------------
def refused(match: str, build, *args, **kwargs) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        build(*args, **kwargs)
    assert not dist.is_initialized()


def test_missing_directory_or_config(tmp_path):
    refused(r"is not a directory; pass a local directory written by save_pretrained", hf.from_pretrained,
            str(tmp_path / "nope"))
    refused(r"has no config.json", hf.from_pretrained, str(tmp_path))


def test_no_safetensors_files(tmp_path):
    tiny_config("llama").save_pretrained(str(tmp_path))
    torch.save({}, tmp_path / "pytorch_model.bin")
    refused(r"no .safetensors files \(found \['pytorch_model.bin'\]\); pipegrid.hf reads safetensors only",
            hf.from_pretrained, str(tmp_path))


def test_unknown_and_unpipelinable_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    refused(r"model_type 'no_such_model', which transformers .* does not know", hf.from_pretrained, str(tmp_path))
    opt = save_config(sweep_config("opt", ffn_dim=32, word_embed_proj_dim=16), str(tmp_path / "opt"))
    refused(r"OPTConfig \(model_type 'opt'\) cannot be cut into pipeline stages: it declares no base_model_pp_plan"
            r".*Pass pp_plan=", hf.from_pretrained, opt)
    refused(r"model_type 't5' .* has no AutoModelForCausalLM class", hf.from_config, sweep_config("t5"))
    refused(r"its plan does not fit", hf.from_config, tiny_config("llama"),
            pp_plan={"layers": (["input_ids"], ["hidden_states"]), "norm": (["hidden_states"], ["hidden_states"])})


def test_tensors_that_disagree_with_config_json(tmp_path):
    directory = save_tiny("llama", str(tmp_path / "llama"))
    config_file = os.path.join(directory, "config.json")
    stored = json.load(open(config_file))
    json.dump({**stored, "intermediate_size": 48}, open(config_file, "w"))
    refused(r"tensors of .* disagree with its config.json .*mlp.gate_proj.weight: stored \[32, 16\], config.json "
            r"implies \[48, 16\].*restore the config.json", hf.from_pretrained, directory)
    json.dump({**stored, "num_hidden_layers": 3}, open(config_file, "w"))
    refused(r"lacks 9 tensors .* e.g. \['model.layers.2", hf.from_pretrained, directory)


def test_tensor_parallel_bad_input_is_refused_before_any_group():
    """No process group exists here: every refusal comes from the config and the meta skeleton."""
    tensor2 = pg.Topology(pipe=1, data=1, tensor=2)
    refused(r"num_key_value_heads=1 is not divisible by 2 .*choose topology.tensor", hf.from_config,
            tiny_config("llama", num_key_value_heads=1), tensor2)
    refused(r"num_attention_heads=4 is not divisible by 8", hf.from_config, tiny_config("llama"), pg.Topology(tensor=8))
    refused(r"vocab_size=63 is not divisible by 2; pad the vocabulary", hf.from_config,
            tiny_config("llama", vocab_size=63), tensor2)
    refused(r"styles pipegrid.hf does not apply: .*q_proj': 'colwise_gather_output'.*packed projections "
            r"\['gate_up_proj', 'qkv_proj'\]", hf.from_config, sweep_config("olmo2"), tensor2)
    refused(r"styles pipegrid.hf does not apply: .*q_norm': 'replicated_with_grad_allreduce'", hf.from_config,
            sweep_config("qwen3"), tensor2)
    moe_style = tiny_config("llama")
    moe_style.base_model_tp_plan = {**moe_style.base_model_tp_plan, "layers.*.mlp.gate_proj": "local_colwise"}
    refused(r"styles pipegrid.hf does not apply: \{'layers.\*.mlp.gate_proj': 'local_colwise'\}", hf.from_config,
            moe_style, tensor2)
    no_plan = tiny_config("llama")
    no_plan.base_model_tp_plan = None
    refused(r"no base_model_tp_plan and pipegrid.hf has no adapter TP plan for model_type 'llama'", hf.from_config,
            no_plan, tensor2)
    with pytest.raises(RuntimeError, match=r"topology.tensor=2 splits .* torch.distributed is not initialised and "
                       r"RANK/WORLD_SIZE are not set; start the job with torchrun --nproc-per-node 2"):
        hf.from_config(tiny_config("gpt2"), tensor2)  # no group given, none can be built here
    assert not dist.is_initialized()


@pytest.mark.parametrize("rule,shape", [(ShardRule(0, (8,)), (8, 3)), (ShardRule(1, (6,)), (4, 6)),
                                        (ShardRule(1, (4, 4, 4), transposed=True), (3, 12)),
                                        (ShardRule(0, (4, 4, 4)), (12,)),
                                        (ShardRule(0, (8, 4, 4)), (16, 3))])  # Phi-3's qkv_proj with GQA
def test_shard_rules_take_read_and_assemble(rule, shape):
    """A rank's shard cut from the whole tensor equals the one read slice by slice, and the
    shards assemble back into the stored tensor (GPT-2's packed, transposed c_attn included)."""
    whole = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    shards = [rule.take(whole, rank, 2) for rank in range(2)]
    for rank, shard in enumerate(shards):
        for block_rows in (1, 2, 100):
            read = torch.full_like(shard, float("nan"))
            rule.copy_slices(read, lambda index: whole[index], rank, 2, block_rows)
            assert torch.equal(read, shard), f"rank {rank}, {block_rows} rows a block"
    assert torch.equal(rule.assemble(shards), whole)


def test_bad_inputs_and_dtypes():
    model = hf.from_config(tiny_config("llama"))
    with pytest.raises(TypeError, match=r"input_ids or \(input_ids, attention_mask\) as integer tensors"):
        model(torch.zeros(2, 6))
    refused(r"dtype must be a torch.dtype, its name or 'auto', got 'float33'", hf.from_config, tiny_config("llama"),
            dtype="float33")
    assert next(hf.from_config(tiny_config("llama"), dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert "LlamaDecoderLayer" in model.describe() and "LMHead" in model.describe()


def test_large_tensors_are_read_in_blocks(tmp_path, monkeypatch):
    directory = save_tiny("llama", str(tmp_path / "llama"))
    monkeypatch.setattr("pipegrid.hf.weights.READ_BLOCK", 100)  # a few rows at a time
    loaded = hf.from_pretrained(directory).hf_state_dict()
    stored = load_reference(directory).state_dict()
    for key, tensor in loaded.items():
        assert torch.equal(tensor, stored[key]), key
