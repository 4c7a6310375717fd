"""Sequence parallelism (pipegrid/tensor/sequence.py) on gloo at tensor=2.

- The mappings and the sequence-parallel linear layers equal their dense counterparts (forward
  and gradients), siblings share one gather, and a length the group does not divide is refused.
- The example GPT with ``sequence_parallel`` at (pipe, data, tensor) = (2,1,2) and (1,2,2), under 1f1b
  and zb_h1 (ZeRO-1, ZeRO-2 reducing every micro-batch, ZeRO-3, the fused loss), trains like the plain-torch
  model in one process (fp32, clipping that bites) and like itself without sequence parallelism.
- pipegrid.hf Llama (GQA, fused loss) and GPT-2 (tied, adapter plan, activation checkpointing)
  at (2,1,2) with ``sequence_parallel=True`` train like transformers in one process on padded
  batches, and evaluate like it (whole logits); generation (the switch off) equals transformers' ``generate``.
- Ten more plan families at (1,1,2) train like transformers with ``sequence_parallel=True``.
- The messages between stages hold 1/tensor of the hidden state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pipegrid as pg
from examples.models.gpt import GPT
from pipegrid import hf
from pipegrid.launch import run_local
from pipegrid.tensor import (ColumnParallelLinear, RowParallelLinear, SharedInputCopy, all_gather_sequence,
                             gather_from_region, gather_from_sequence_region, is_sequence_parallel,
                             reduce_scatter_sequence, scatter_to_sequence_region)
from tests.support.engine_cases import config, global_batches, run_tensor_gpt
from tests.support.hf_models import (ATTN, SEQ_LEN, assert_ranks_match, lm_batches, load_reference, reference_step,
                                     save_config, save_tiny, sweep_config, tiny_config)
from tests.support.reference import PlainGPT, train
from tests.support.tensor_gpt import GPT_CFG, assert_matches_dense

SP_CFG = dataclasses.replace(GPT_CFG, sequence_parallel=True)
GLOBAL, CLIP = 4, 0.05  # micro-batches per step; clipping bites every step (asserted)
SGD = {"_target_": "torch.optim.SGD", "lr": 0.2, "momentum": 0.9}
FUSED = {"loss": {"chunked": "true", "chunk_tokens": 4}}  # the head's inputs go to the chunked loss


# ---- layers (2 ranks, the world as the tensor group) -------------------------------------------

def _chunk(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return t.chunk(dist.get_world_size(), dim=dim)[dist.get_rank()]


def _mapping_cases() -> dict:
    torch.manual_seed(0)
    whole = torch.randn(2, 6, 4)
    up = torch.randn(2, 6, 4)
    world = dist.group.WORLD
    out = {}
    x = whole.clone().requires_grad_()
    y = scatter_to_sequence_region(x, world)
    (grad,) = torch.autograd.grad((y * _chunk(up)).sum(), x)
    out["scatter"] = [(y, _chunk(whole)), (grad, up)]
    x = _chunk(whole).clone().requires_grad_()
    y = gather_from_sequence_region(x, world)
    (grad,) = torch.autograd.grad((y * up).sum(), x)
    out["gather"] = [(y, whole), (grad, _chunk(up))]
    # the region's gradient is partial per rank (rank r's is (r + 1) * up): summed, then chunked
    y = all_gather_sequence(x, world)
    (grad,) = torch.autograd.grad((y * up * (dist.get_rank() + 1)).sum(), x)
    out["all_gather"] = [(y, whole), (grad, _chunk(up) * 3)]
    partial = (whole * (dist.get_rank() + 1)).requires_grad_()
    y = reduce_scatter_sequence(partial, world)
    (grad,) = torch.autograd.grad((y * _chunk(up)).sum(), partial)
    out["reduce_scatter"] = [(y, _chunk(whole) * 3), (grad, up)]
    return out


def _linear_cases() -> dict:
    """An MLP block, column -> row, sequence-parallel against dense: output chunk and every gradient."""
    world = dist.group.WORLD
    torch.manual_seed(1)
    dense_up, dense_down = nn.Linear(4, 8), nn.Linear(8, 4)
    up = ColumnParallelLinear(4, 8, group=world, init_from=dense_up, sequence_parallel=True)
    down = RowParallelLinear(8, 4, group=world, init_from=dense_down, sequence_parallel=True)
    x = torch.randn(2, 6, 4, requires_grad=True)
    grad_out = torch.randn(2, 6, 4)
    want = dense_down(torch.relu(dense_up(x)))
    want_grads = torch.autograd.grad((want * grad_out).sum(), [x, dense_up.weight, dense_down.weight, dense_down.bias])
    mine = _chunk(x.detach()).requires_grad_()
    got = down(torch.relu(up(mine)))
    grads = torch.autograd.grad((got * _chunk(grad_out)).sum(), [mine, up.weight, down.weight, down.bias])
    bias_sum = grads[3].clone()
    dist.all_reduce(bias_sum)  # a row bias under sequence parallelism: partial, summed by the engine
    return {"output": (got, _chunk(want)), "input_grad": (grads[0], _chunk(want_grads[0])),
            "column_weight_grad": (grads[1], want_grads[1].chunk(2, dim=0)[dist.get_rank()]),
            "row_weight_grad": (grads[2], want_grads[2].chunk(2, dim=1)[dist.get_rank()]),
            "row_bias_grad": (bias_sum, want_grads[3]), "marked": is_sequence_parallel(down.bias)}


def _gather_nodes(outputs: list[torch.Tensor]) -> int:
    """The sequence all-gathers the outputs' autograd graphs pass through."""
    seen, found, stack = set(), set(), [y.grad_fn for y in outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "AllGatherSequence" in node.name():
            found.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(found)


def _shared_gathers() -> tuple[int, set]:
    """q, k and v sharing one entry gather their input once: (all-gathers, output shapes)."""
    world = dist.group.WORLD
    parent = nn.ModuleDict({name: ColumnParallelLinear(4, 4, group=world, sequence_parallel=True)
                            for name in ("q", "k", "v")})
    shared = SharedInputCopy(world, sequence_parallel=True)
    shared.attach(parent)
    for column in parent.values():
        column.input_copy = shared
    parent.forward = lambda x: [column(x) for column in parent.values()]  # type: ignore[method-assign]
    outs = parent(torch.randn(1, 2, 4, requires_grad=True))
    return _gather_nodes(outs), {tuple(y.shape) for y in outs}


def _saved_numels() -> list[int]:
    """What autograd keeps of a sequence-parallel column layer's input, seen through an outer hook: the
    gathered (B, T, in) is kept as this rank's chunk instead (gathered again for the weight gradient)."""
    layer = ColumnParallelLinear(5, 6, group=dist.group.WORLD, sequence_parallel=True)
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t

    chunk = torch.randn(2, 3, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(chunk)
    y.sum().backward()  # the re-gather in backward must work
    return seen


def _refused_length() -> str:
    groups = pg.init_distributed({"topology": {"tensor": 2}})
    model = GPT(SP_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    engine = pg.initialize(model, {"schedule": {"micro_batches": 1}, "comm": {"timeout_s": 60}}, groups)
    ids = torch.zeros(2, 5, dtype=torch.long)
    try:
        engine.train_batch(iter([(ids, ids)]))
    except ValueError as error:
        return str(error)
    return "no error"


def _layer_results() -> dict:
    cases = {**{f"mapping_{k}": v for k, v in _mapping_cases().items()}}
    linear = _linear_cases()
    marked = linear.pop("marked")
    detached = {name: [(a.detach(), b.detach()) for a, b in pairs] for name, pairs in cases.items()}
    detached["linear"] = [(a.detach(), b.detach()) for a, b in linear.values()]
    return {"cases": detached, "marked": marked, "shared": _shared_gathers(), "saved": _saved_numels(),
            "refused": _refused_length()}


@pytest.fixture(scope="module")
def layer_results() -> list[dict]:
    return run_local(_layer_results, 2, timeout_s=120)


def test_mappings_and_layers_match_dense(layer_results):
    for rank, result in enumerate(layer_results):
        for name, pairs in result["cases"].items():
            for i, (got, want) in enumerate(pairs):
                where = f"rank {rank} {name}[{i}]"
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")
        assert result["marked"], "a sequence-parallel row bias must be marked sequence_parallel"
        assert 2 * 6 * 5 not in result["saved"], result["saved"]  # the whole input (B, T, in) is not kept
        gathers, shapes = result["shared"]
        assert gathers == 1 and shapes == {(1, 4, 2)}, result["shared"]  # one gather; every token, own features


def test_a_length_the_tensor_group_does_not_divide_is_refused(layer_results):
    message = layer_results[0]["refused"]
    assert "sequence length 5" in message and "pad the sequences to a multiple of 2" in message, message


def test_sequence_parallel_needs_a_tensor_group():
    with pytest.raises(ValueError, match="sequence_parallel=True splits the sequence over the tensor group, but "
                                         "topology.tensor=1; set topology.tensor >= 2"):
        GPT(SP_CFG, topology=pg.Topology(pipe=1))
    with pytest.raises(ValueError, match="choose seq_len a multiple of 4"):
        GPT(dataclasses.replace(SP_CFG, seq_len=6, n_head=4, n_embd=8, vocab_size=16), topology=pg.Topology(tensor=4),
            tensor_group=None)
    with pytest.raises(ValueError, match="topology.tensor=1; pass a topology with tensor >= 2 or sequence_parallel"):
        hf.from_config(tiny_config("llama"), topology=pg.Topology(pipe=2), sequence_parallel=True)  # no group made


def test_the_gpt_app_takes_model_sequence_parallel_and_refuses_it_at_tensor_1():
    from hydra import compose, initialize_config_module

    from pipegrid.conf.checks import to_app_config
    from pipegrid.conf.store import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="pipegrid.conf"):
        app = to_app_config(compose("gpt", overrides=["topology.tensor=2", "model.sequence_parallel=true"]))
        assert app.model.sequence_parallel
        with pytest.raises(ValueError, match="model.sequence_parallel=true splits model.seq_len=64 over "
                                             "topology.tensor=1 ranks; it needs topology.tensor >= 2"):
            to_app_config(compose("gpt", overrides=["model.sequence_parallel=true"]))


# ---- training (4 ranks: every grid of one launch) -----------------------------------------------

GPT_CASES = {  # name: (schedule, pipe, data, extra config)
    "2x1x2-1f1b": ("1f1b", 2, 1, {}),
    "2x1x2-zb_h1-fused": ("zb_h1", 2, 1, FUSED),
    "1x2x2-1f1b-zero1": ("1f1b", 1, 2, {"zero": {"stage": 1}}),
    "1x2x2-zb_h1-zero2": ("zb_h1", 1, 2, {"zero": {"stage": 2, "reduce_every_micro_batch": True}}),
    "1x2x2-1f1b-zero3": ("1f1b", 1, 2, {"zero": {"stage": 3}}),
}
HF_STEPS, HF_MICRO_BATCHES, HF_CLIP = 3, 2, 0.5
HF_SGD = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}
HF_CASES = {  # name: (family, schedule, model keywords, extra config)
    "llama-1f1b-fused": ("llama", "1f1b", {}, FUSED),
    "gpt2-zb_h1-recompute-fused": ("gpt2", "zb_h1", {"activation_checkpoint_interval": 1}, FUSED),  # tied head
}


def _gpt_config(name: str) -> dict:
    schedule, pipe, data, extra = GPT_CASES[name]
    cfg = config(schedule, pipe, data, GLOBAL // data, optimizer=SGD, grad_clip=CLIP, **extra)
    cfg["topology"]["tensor"] = 2
    return cfg


def _hf_config(name: str) -> dict:
    extra = HF_CASES[name][3]
    return {"topology": {"pipe": 2, "data": 1, "tensor": 2},
            "schedule": {"name": HF_CASES[name][1], "micro_batches": HF_MICRO_BATCHES},
            "optimizer": HF_SGD, "train": {"grad_clip": HF_CLIP}, "comm": {"timeout_s": 60}, **extra}


def _hf_batches(step: int) -> list:
    return lm_batches(HF_MICRO_BATCHES, seed=100 + step, padded=True)


def _prompts() -> torch.Tensor:
    return lm_batches(1, seed=9)[0][0]


def _first_stage_output(engine: pg.PipelineEngine, inputs) -> list[int] | None:
    """The shape of the hidden state pipe rank 0 sends (its stage's output), None on other pipe ranks."""
    if engine.groups.coord.pipe != 0:
        return None
    with torch.no_grad():
        out = engine.module.stage_module(0)(inputs)
    return list((out[0] if isinstance(out, tuple) else out).shape)


def _gpt_message(sequence_parallel: bool) -> list[int] | None:
    cfg = _gpt_config("2x1x2-1f1b")
    groups = pg.init_distributed(cfg)
    model = GPT(SP_CFG if sequence_parallel else GPT_CFG, topology=groups.topology,
                tensor_group=groups.tensor_parallel_group)
    return _first_stage_output(pg.initialize(model, cfg, groups), global_batches(0, 1, 1)[0][0])


def _hf_run(directory: str, name: str, sequence_parallel: bool = True) -> dict:
    family, _, model_kwargs, _ = HF_CASES[name]
    cfg = _hf_config(name)
    groups = pg.init_distributed(cfg)
    model = hf.from_pretrained(directory, topology=groups.topology, attn_implementation=ATTN,
                               tensor_group=groups.tensor_parallel_group, sequence_parallel=sequence_parallel,
                               **model_kwargs)
    engine = pg.initialize(model, cfg, groups)
    losses = [engine.train_batch(iter(_hf_batches(s))) for s in range(HF_STEPS)]
    _, logits = engine.eval_batch(iter(_hf_batches(7)), return_outputs=True)  # whole sequences, vocab shards
    result = {"losses": losses, "tensors": {k: t.detach().clone() for k, t in model.hf_state_dict().items()},
              "message": _first_stage_output(engine, _hf_batches(0)[0][0]),
              "logits": None if logits is None else [gather_from_region(x, groups.tensor_parallel_group)
                                                      for x in logits]}
    if family == "llama":  # decode steps have one token: generation runs with the switch off, then it is on again
        result["generated"] = engine.generate(_prompts(), max_new_tokens=3)
        result["switch_after"] = bool(model.sequence_parallel)
    return result


def _training_runs(directories: dict[str, str]) -> dict:
    out = {name: run_tensor_gpt(_gpt_config(name), gpt_cfg=SP_CFG) for name in GPT_CASES}
    out["2x1x2-1f1b-off"] = run_tensor_gpt(_gpt_config("2x1x2-1f1b"))
    out["message"] = {"on": _gpt_message(True), "off": _gpt_message(False)}
    for name, (family, *_) in HF_CASES.items():
        out[name] = _hf_run(directories[family], name)
    out["hf-message-off"] = _hf_run(directories["llama"], "llama-1f1b-fused", sequence_parallel=False)["message"]
    return out


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> tuple[dict, list[dict]]:
    root = tmp_path_factory.mktemp("seqpar")
    directories = {family: save_tiny(family, str(root / family)) for family in ("llama", "gpt2")}
    return directories, run_local(_training_runs, 4, (directories,), timeout_s=300)


@pytest.mark.parametrize("name", list(GPT_CASES))
def test_gpt_trains_like_the_one_process_model(training, name):
    _, per_rank = training
    data = GPT_CASES[name][2]
    reference = train(PlainGPT(GPT_CFG), [global_batches(s, data, GLOBAL // data) for s in range(3)], SGD, CLIP)
    assert min(reference["norms"]) > CLIP, reference["norms"]  # clipping bites every step
    assert_matches_dense([rank[name] for rank in per_rank], reference)


def test_gpt_losses_are_the_same_with_and_without_sequence_parallelism(training):
    for rank in training[1]:
        torch.testing.assert_close(torch.tensor(rank["2x1x2-1f1b"]["losses"]),
                                   torch.tensor(rank["2x1x2-1f1b-off"]["losses"]), rtol=1e-6, atol=1e-6)


def test_messages_between_stages_hold_one_tensor_rank_of_the_sequence(training):
    directories, per_rank = training
    for rank in per_rank[:2]:  # pipe rank 0 (tensor ranks 0 and 1): the senders
        on, off = rank["message"]["on"], rank["message"]["off"]
        assert off[1] == SP_CFG.seq_len and on == [off[0], off[1] // 2, off[2]], (on, off)
        hf_on, hf_off = rank["llama-1f1b-fused"]["message"], rank["hf-message-off"]
        assert hf_off[1] == SEQ_LEN and hf_on == [hf_off[0], hf_off[1] // 2, hf_off[2]], (hf_on, hf_off)


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_trains_like_transformers(training, name):
    directories, per_rank = training
    reference = load_reference(directories[HF_CASES[name][0]]).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    losses = [reference_step(reference, _hf_batches(s), optimizer, HF_CLIP) for s in range(HF_STEPS)]
    assert_ranks_match(name, [rank[name] for rank in per_rank], losses, reference.state_dict(),
                       reference.config.tie_word_embeddings, 1e-5, 1e-6)
    with torch.no_grad():
        want = [reference.eval()(input_ids=ids, attention_mask=mask).logits for (ids, mask), _ in _hf_batches(7)]
    last = [rank[name]["logits"] for rank in per_rank if rank[name]["logits"] is not None]
    assert len(last) == 2, "the two tensor ranks of the last stage return the eval logits"
    for logits in last:
        for got, expected in zip(logits, want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} eval logits: {m}")
    if "generated" in per_rank[0][name]:
        want = reference.eval().generate(_prompts(), max_new_tokens=3, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)
        for rank in per_rank:
            assert torch.equal(rank[name]["generated"], want), (rank[name]["generated"], want)
            assert rank[name]["switch_after"], "generate must turn sequence parallelism back on"


# ---- more families at (1,1,2): whatever each decoder layer does, on a chunk of the sequence ------

SWEEP = ("qwen2", "mistral", "phi3", "gemma", "gemma2", "granite", "starcoder2", "cohere", "gpt_neox", "phi")


def _sweep(directories: dict[str, str]) -> dict[str, dict]:
    cfg = {**_hf_config("llama-1f1b-fused"), "topology": {"pipe": 1, "data": 1, "tensor": 2}, "loss": {}}
    groups = pg.init_distributed(cfg)
    out = {}
    for family, directory in directories.items():
        model = hf.from_pretrained(directory, topology=groups.topology, attn_implementation=ATTN,
                                   tensor_group=groups.tensor_parallel_group, sequence_parallel=True)
        engine = pg.initialize(model, cfg, groups)
        out[family] = {"losses": [engine.train_batch(iter(_hf_batches(s))) for s in range(HF_STEPS)],
                       "tensors": {k: t.detach().clone() for k, t in model.hf_state_dict().items()}}
    return out


def test_more_families_train_like_transformers(tmp_path):
    """GQA, sliding windows, packed projections, scaled embeddings, soft-capping, biases, parallel attention."""
    directories = {family: save_config(sweep_config(family), str(tmp_path / family)) for family in SWEEP}
    per_rank = run_local(_sweep, 2, (directories,), timeout_s=300)
    for family, directory in directories.items():
        reference = load_reference(directory).train()
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
        losses = [reference_step(reference, _hf_batches(s), optimizer, HF_CLIP) for s in range(HF_STEPS)]
        assert_ranks_match(family, [rank[family] for rank in per_rank], losses, reference.state_dict(),
                           reference.config.tie_word_embeddings, 1e-5, 1e-6)
