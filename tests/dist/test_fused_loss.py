"""The fused LM loss (``loss.chunked=true``) on gloo: head + cross-entropy chunked over tokens
trains like the one-process plain-torch and transformers references.

- the chunked loss over a vocab split at tensor=2 equals the one-process loss and its gradients;
- the example GPT (tied embedding: the head's weight gradient crosses stages) at pipe 2 under
  zb_h1 (split backward), pipe 1 x tensor 2, and pipe 2 x tensor 2, against the dense GPT;
- transformers GPT-2 (tied) and Llama (untied) at pipe 2 (1f1b, zb_h1) and GPT-2 at pipe 2 x
  tensor 2, padded batches, clipping on, against transformers in one process.

Micro-batches of 12 tokens in chunks of 5 (5 + 5 + 2), some labels -100.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipegrid as pg
from examples.models.gpt import GPT
from pipegrid import hf
from pipegrid.launch import run_local
from pipegrid.tensor import LMHeadInputs, copy_to_region, linear_cross_entropy
from tests.support.engine_cases import config, global_batches
from tests.support.hf_models import ATTN, assert_ranks_match, lm_batches, load_reference, reference_step, save_tiny
from tests.support.reference import PlainGPT, train
from tests.support.tensor_gpt import GPT_CFG, assert_matches_dense, sharded_state

STEPS, GLOBAL, CLIP = 3, 4, 0.5
LOSS = {"chunked": "true", "chunk_tokens": 5}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}


# ---- the loss alone, vocab split over two ranks ----------------------------------------

def _vocab_parallel_case() -> dict:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (13,), generator=gen)
    labels[[2, 7]] = -100
    group, rank = dist.group.WORLD, dist.get_rank()
    leaf = hidden.clone().requires_grad_()
    shard = weight.chunk(2)[rank].clone().requires_grad_()
    loss = linear_cross_entropy(LMHeadInputs(copy_to_region(leaf, group), shard), labels, group, chunk_tokens=3)
    (loss * 1.5).backward()
    dense_h, dense_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = F.cross_entropy(dense_h @ dense_w.T, labels)
    (want * 1.5).backward()
    return {"loss": (loss, want), "hidden_grad": (leaf.grad, dense_h.grad),
            "weight_grad": (shard.grad, dense_w.grad.chunk(2)[rank])}


def test_vocab_parallel_chunked_loss_equals_one_process():
    for case in run_local(_vocab_parallel_case, 2, timeout_s=60):
        for name, (got, want) in case.items():
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


# ---- the example GPT ------------------------------------------------------------------

def _gpt_batches(step: int) -> list:
    batches = global_batches(step, 1, GLOBAL)
    for k, (_, labels) in enumerate(batches):
        labels[k % 2, : 1 + k] = -100  # padding-like ignored labels, differing per micro-batch
    return batches


GPT_CASES = {"pipe2-zb_h1": ("zb_h1", 2, 1), "tensor2-1f1b": ("1f1b", 1, 2), "pipe2-tensor2-zb_h1": ("zb_h1", 2, 2)}


def _gpt_config(schedule: str, pipe: int, tensor: int) -> dict:
    cfg = config(schedule, pipe, 1, GLOBAL, grad_clip=CLIP, loss=LOSS)
    cfg["topology"]["tensor"] = tensor
    return cfg


def _gpt_run(names: list[str]) -> dict:
    out = {}
    for name in names:
        cfg = _gpt_config(*GPT_CASES[name])
        groups = pg.init_distributed(cfg)
        model = GPT(GPT_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                    virtual_stages=cfg["schedule"]["virtual_stages"])
        engine = pg.initialize(model, cfg, groups=groups)
        losses = [engine.train_batch(iter(_gpt_batches(s))) for s in range(STEPS)]
        last = groups.coord.pipe == groups.topology.pipe - 1
        out[name] = {"losses": losses, "state": sharded_state(engine.module), "coord": tuple(groups.coord),
                     "kernel": model.loss_fn.kernel if last else "torch"}
    return out


@pytest.fixture(scope="module")
def gpt_results() -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for world in (2, 4):
        names = [n for n, (_, pipe, tensor) in GPT_CASES.items() if pipe * tensor == world]
        per_rank = run_local(_gpt_run, world, (names,), timeout_s=300)
        results.update({name: [rank[name] for rank in per_rank] for name in names})
    return results


@pytest.mark.parametrize("name", list(GPT_CASES))
def test_gpt_example_chunked_trains_like_the_dense_reference(gpt_results, name):
    per_rank = gpt_results[name]
    assert all(r["kernel"] == "torch" for r in per_rank), "the chunked loss did not run"
    steps = [_gpt_batches(s) for s in range(STEPS)]
    assert_matches_dense(per_rank, train(PlainGPT(GPT_CFG), steps, SGD, CLIP))


# ---- transformers models -----------------------------------------------------------------

HF_CASES = [("gpt2", "zb_h1", 2, 1), ("llama", "1f1b", 2, 1), ("llama", "zb_h1", 2, 1), ("gpt2", "1f1b", 2, 2)]


def _hf_batches(step: int) -> list:
    return lm_batches(2, seed=100 + step, padded=True)


def _hf_run(cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        cfg = {"topology": {"pipe": case["pipe"], "tensor": case["tensor"]},
               "schedule": {"name": case["schedule"], "micro_batches": 2}, "optimizer": SGD,
               "train": {"grad_clip": CLIP}, "comm": {"timeout_s": 60}, "loss": LOSS}
        groups = pg.init_distributed(cfg)
        model = hf.from_pretrained(case["dir"], topology=groups.topology, attn_implementation=ATTN,
                                   tensor_group=groups.tensor_parallel_group)
        engine = pg.initialize(model, cfg, groups=groups)
        losses = [engine.train_batch(iter(_hf_batches(s))) for s in range(STEPS)]
        tensors = {key: t.detach().clone() for key, t in model.hf_state_dict().items()}  # shards gathered
        out.append({"losses": losses, "tensors": tensors, "kernel": model.loss_fn.kernel})
    return out


def test_transformers_models_chunked_train_like_transformers(tmp_path):
    dirs = {family: save_tiny(family, str(tmp_path / family)) for family in ("gpt2", "llama")}
    cases = [{"dir": dirs[family], "family": family, "schedule": schedule, "pipe": pipe, "tensor": tensor}
             for family, schedule, pipe, tensor in HF_CASES]
    per_world: dict[int, list[list[dict]]] = {}
    for world in (2, 4):
        mine = [c for c in cases if c["pipe"] * c["tensor"] == world]
        per_world[world] = run_local(_hf_run, world, (mine,), timeout_s=300)
    references = {}
    for world, per_rank in per_world.items():
        mine = [c for c in cases if c["pipe"] * c["tensor"] == world]
        for i, case in enumerate(mine):
            if case["family"] not in references:
                model = load_reference(case["dir"]).train()
                optimizer = torch.optim.SGD(model.parameters(), lr=SGD["lr"], momentum=SGD["momentum"])
                losses = [reference_step(model, _hf_batches(s), optimizer, CLIP) for s in range(STEPS)]
                references[case["family"]] = (model, losses)
            model, losses = references[case["family"]]
            results = [rank[i] for rank in per_rank]
            assert any(r["kernel"] == "torch" for r in results), "the chunked loss did not run"
            name = f"{case['family']} {case['schedule']} pipe={case['pipe']} tensor={case['tensor']}"
            assert_ranks_match(name, results, losses, model.state_dict(), model.config.tie_word_embeddings,
                               rtol=1e-5, atol=1e-6)
