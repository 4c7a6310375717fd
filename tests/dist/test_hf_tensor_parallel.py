"""pipegrid.hf split over a tensor group (tensor=2) on gloo: each family trains like the
transformers model in one process, at (pipe, data, tensor) = (1,1,2), (2,1,2), (2,2,2), (3,1,2),
and with ZeRO-1, activation checkpointing and interleaving at (2,2,2).

One launch per grid runs every case: Llama (GQA, untied), GPT-2 (tied, adapter TP plan),
Qwen2 (tied, q/k/v bias), Mistral (GQA, sliding window), and at (1,1,2) and (2,1,2) Phi-3 (packed
qkv_proj and gate_up_proj) under 1f1b and zb_h1 (split backward), padded batches, clipping that bites. After 3 steps the losses, every parameter
(the shards gathered), the eval logits (vocab shards gathered by the test) and the logits of
the saved directory loaded by transformers must equal the one-process model's. Every split
tensor was read as a shard, never whole.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid import hf
from pipegrid.hf.weights import CheckpointWeights
from pipegrid.launch import run_local
from tests.support.hf_models import (ATTN, assert_ranks_match, lm_batches, load_reference, reference_step,
                                     save_config, save_tiny, sweep_config, tiny_config)

FAMILIES = ("llama", "gpt2", "qwen2", "mistral")
PACKED = ("phi3",)  # packed qkv_proj (GQA) and gate_up_proj, split per part: at (1,1,2) and (2,1,2)
SCHEDULES = ("1f1b", "zb_h1")
STEPS, MICRO_BATCHES, CLIP = 3, 2, 0.5
SGD = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}
RTOL, ATOL = 1e-5, 1e-6


ADAM = {"_target_": "torch.optim.AdamW", "lr": 1e-2, "eps": 1e-5}  # eps: see test_hf_training
# Adam divides each gradient by its own running scale: a near-zero gradient's last-bit difference
# (the vocab-parallel loss sums in another order) moves its weight by up to ~1e-6 of lr=1e-2
ADAM_ATOL = 1e-5


def _config(schedule: str, pipe: int, data: int, optimizer: dict = SGD, virtual_stages: int = 1, **extra) -> dict:
    return {"topology": {"pipe": pipe, "data": data, "tensor": 2},
            "schedule": {"name": schedule, "micro_batches": MICRO_BATCHES, "virtual_stages": virtual_stages},
            "optimizer": optimizer, "train": {"grad_clip": CLIP}, "comm": {"timeout_s": 60}, **extra}


def _step_batches(step: int, data: int) -> list:
    return lm_batches(MICRO_BATCHES * data, seed=100 + step, padded=True)


def _eval_batches() -> list:
    return lm_batches(MICRO_BATCHES, seed=7, padded=True)


def _gather_vocab(logits: torch.Tensor, group) -> torch.Tensor:
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def _train(case: dict, groups: pg.ProcessGroups, reads: list) -> dict:
    """On every rank: load (shards only), train, evaluate, save; losses, whole tensors, whole logits."""
    reads.clear()
    model = hf.from_pretrained(case["dir"], topology=groups.topology, attn_implementation=ATTN,
                               tensor_group=groups.tensor_parallel_group,
                               virtual_stages=case["config"]["schedule"]["virtual_stages"], **case.get("model", {}))
    split_keys = set(model.skeleton.split.rules)
    whole_reads = [key for key, shard in reads if key in split_keys and shard is None]
    engine = pg.initialize(model, case["config"], groups)
    data, m = groups.coord.data, MICRO_BATCHES
    losses = [engine.train_batch(iter(_step_batches(s, groups.topology.data)[data * m:(data + 1) * m]))
              for s in range(STEPS)]
    _, logits = engine.eval_batch(iter(_eval_batches()), return_outputs=True)
    if logits is not None:
        logits = [_gather_vocab(x, groups.tensor_parallel_group) for x in logits]
    hf.save_pretrained(engine, case["save"])
    tensors = {key: t.detach().clone() for key, t in model.hf_state_dict().items()}
    return {"losses": losses, "tensors": tensors, "logits": logits, "whole_reads": whole_reads,
            "split_keys": len(split_keys)}


def _run_cases(cases: list[dict]) -> list[dict]:
    groups = pg.init_distributed(cases[0]["config"])  # one grid per launch: its groups serve every case
    reads: list = []
    original = CheckpointWeights.read_into

    def recording(self, target, key, shard=None):
        reads.append((key, shard))
        return original(self, target, key, shard)

    CheckpointWeights.read_into = recording  # this worker process only
    return [_train(case, groups, reads) for case in cases]


_REFERENCES: dict[tuple, tuple[torch.nn.Module, list[float]]] = {}


def _reference(directory: str, data: int, optimizer_cfg: dict) -> tuple[torch.nn.Module, list[float]]:
    """The transformers model trained in one process on the same global batches (once per family,
    data degree and optimizer)."""
    key = (directory, data, tuple(sorted(optimizer_cfg.items())))
    if key not in _REFERENCES:
        model = load_reference(directory).train()
        kwargs = dict(optimizer_cfg)
        optimizer = getattr(torch.optim, kwargs.pop("_target_").rsplit(".", 1)[1])(model.parameters(), **kwargs)
        losses = [reference_step(model, _step_batches(s, data), optimizer, CLIP) for s in range(STEPS)]
        _REFERENCES[key] = (model.eval(), losses)
    return _REFERENCES[key]


@torch.no_grad()
def _logits(model: torch.nn.Module) -> list[torch.Tensor]:
    return [model(input_ids=ids, attention_mask=mask).logits for (ids, mask), _ in _eval_batches()]


def _check(case: dict, per_rank: list[dict]) -> None:
    cfg = case["config"]
    reference, losses = _reference(case["dir"], cfg["topology"]["data"], cfg["optimizer"])
    state = reference.state_dict()
    name = f"{os.path.basename(case['dir'])} {case['config']['schedule']['name']}"
    atol = case.get("atol", ATOL)
    for rank, result in enumerate(per_rank):
        assert result["split_keys"] > 0 and not result["whole_reads"], f"{name} rank {rank}: read whole " \
            f"{result['whole_reads']}"
    assert_ranks_match(name, per_rank, losses, state, reference.config.tie_word_embeddings, RTOL, atol,
                       loss_atol=ATOL)
    want = _logits(reference)
    last = [r["logits"] for r in per_rank if r["logits"] is not None]
    assert last, f"{name}: no rank returned logits"
    for logits in last:
        for got, expected in zip(logits, want):
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{name} eval logits: {m}")
    for got, expected in zip(_logits(load_reference(case["save"])), want):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{name} saved: {m}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-tp")
    return {family: save_tiny(family, str(root / family)) for family in FAMILIES + PACKED}


@pytest.mark.parametrize("pipe,data", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_tensor_parallel_trains_and_saves_like_transformers(checkpoints, tmp_path, pipe, data):
    families = FAMILIES + (PACKED if (pipe, data) in ((1, 1), (2, 1)) else ())
    cases = [{"dir": checkpoints[family], "config": _config(schedule, pipe, data),
              "save": str(tmp_path / f"{family}-{schedule}")} for family in families for schedule in SCHEDULES]
    per_rank = run_local(_run_cases, pipe * data * 2, (cases,), timeout_s=600)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in per_rank])


def test_tensor_parallel_composes_with_zero_1_2_3_interleaving_zb_v_and_activation_checkpointing(checkpoints, tmp_path):
    cases = [
        {"dir": checkpoints["llama"], "save": str(tmp_path / "zero"),
         "config": _config("1f1b", 2, 2, ADAM, zero={"stage": 1}), "model": {"activation_checkpoint_interval": 1},
         "atol": ADAM_ATOL},
        {"dir": checkpoints["gpt2"], "save": str(tmp_path / "zero-tied"),
         "config": _config("gpipe", 2, 2, ADAM, zero={"stage": 1}), "atol": ADAM_ATOL},
        {"dir": checkpoints["qwen2"], "save": str(tmp_path / "interleaved"),
         "config": _config("interleaved_1f1b", 2, 2, virtual_stages=2)},
        {"dir": checkpoints["mistral"], "save": str(tmp_path / "zb_v"),  # V placement: first and last stage on rank 0
         "config": _config("zb_v", 2, 2, virtual_stages=2), "model": {"stage_placement": "v"}},
        {"dir": checkpoints["llama"], "save": str(tmp_path / "zero2"),
         "config": _config("zb_h1", 2, 2, ADAM, zero={"stage": 2}), "atol": ADAM_ATOL},
        {"dir": checkpoints["gpt2"], "save": str(tmp_path / "zero3-tied"),  # parameters gathered per step
         "config": _config("1f1b", 2, 2, ADAM, zero={"stage": 3}), "atol": ADAM_ATOL},
    ]
    per_rank = run_local(_run_cases, 8, (cases,), timeout_s=600)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in per_rank])


def _random_start(family: str) -> dict[str, torch.Tensor]:
    groups = pg.init_distributed({"topology": {"pipe": 2, "data": 1, "tensor": 2}})
    model = hf.from_config(tiny_config(family), topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    return {key: t.detach().clone() for key, t in model.hf_state_dict().items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_config_starts_as_the_dense_model(family):
    """Random init draws each whole tensor as transformers would and keeps this rank's shard."""
    dense = hf.from_config(tiny_config(family)).hf_state_dict()
    seen = set()
    for rank, tensors in enumerate(run_local(_random_start, 4, (family,), timeout_s=120)):
        for key, tensor in tensors.items():
            assert torch.equal(tensor, dense[key]), f"{family} rank {rank}: {key} starts differently"
            seen.add(key)
    assert seen == set(dense), f"never compared: {set(dense) - seen}"


# more plan families, one launch at tensor=2: a scaled embedding subclass (gemma), soft-capping (gemma2),
# multipliers (granite), biases and an ungated MLP (starcoder2), parallel attention (cohere, phi),
# a fused per-head query_key_value and an embedding_rowwise entry (gpt_neox)
SPLIT_FAMILIES = ("gemma", "gemma2", "granite", "starcoder2", "cohere", "gpt_neox", "phi")


def _sweep(directories: dict[str, str]) -> dict[str, tuple]:
    cfg = _config("1f1b", 1, 1)
    groups = pg.init_distributed(cfg)
    out = {}
    for family, directory in directories.items():
        model = hf.from_pretrained(directory, topology=groups.topology, attn_implementation=ATTN,
                                   tensor_group=groups.tensor_parallel_group)
        engine = pg.initialize(model, cfg, groups)
        losses = [engine.train_batch(iter(_step_batches(s, 1))) for s in range(STEPS)]
        out[family] = (losses, {key: t.detach().clone() for key, t in model.hf_state_dict().items()})
    return out


def test_more_plan_families_train_like_transformers(tmp_path):
    directories = {family: save_config(sweep_config(family), str(tmp_path / family)) for family in SPLIT_FAMILIES}
    results = run_local(_sweep, 2, (directories,), timeout_s=600)
    for family, directory in directories.items():
        reference, losses = _reference(directory, 1, SGD)
        state = reference.state_dict()
        for rank, per_family in enumerate(results):
            got_losses, tensors = per_family[family]
            torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(losses), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{family} rank {rank} losses: {m}")
            for key, value in tensors.items():
                torch.testing.assert_close(value, state[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{family} rank {rank} {key}: {m}")
