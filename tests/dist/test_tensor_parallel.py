"""Tensor parallelism on gloo at tensor=2: each layer matches its dense counterpart (init,
forward, gradients), and the TP GPT trains like the one-process dense GPT."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipegrid as pg
from examples.models.gpt import GPT, GPTConfig
from pipegrid.launch import run_local
from pipegrid.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                             vocab_parallel_cross_entropy)

IN, OUT, VOCAB = 6, 8, 10


def _shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's slice of ``t`` along ``dim`` (tensor group = WORLD, the world of 2)."""
    return t.chunk(dist.get_world_size(), dim=dim)[dist.get_rank()]


def WORLD():  # noqa: N802 - reads as the group it returns
    """Split over every process: a layer's group=None means no tensor parallelism."""
    return dist.group.WORLD


def _grads(out: torch.Tensor, upstream: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * upstream).sum(), tensors))


def _column_case(gather_output: bool) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(IN, OUT, gather_output=gather_output, group=WORLD())
    x = torch.randn(3, 4, IN, requires_grad=True)
    upstream = torch.randn(3, 4, OUT)
    want = dense(x)
    got = layer(x)
    want_dx, want_dw, want_db = _grads(want, upstream, x, dense.weight, dense.bias)
    up = upstream if gather_output else _shard(upstream, -1)
    dx, dw, db = _grads(got, up, x, layer.weight, layer.bias)
    return {"init_weight": (layer.weight, _shard(dense.weight, 0)), "init_bias": (layer.bias, _shard(dense.bias, 0)),
            "output": (got, want if gather_output else _shard(want, -1)), "input_grad": (dx, want_dx),
            "weight_grad": (dw, _shard(want_dw, 0)), "bias_grad": (db, _shard(want_db, 0))}


def _row_case(input_is_parallel: bool) -> dict:
    torch.manual_seed(1)
    dense = nn.Linear(OUT, IN)
    torch.manual_seed(1)
    layer = RowParallelLinear(OUT, IN, input_is_parallel=input_is_parallel, group=WORLD())
    x = torch.randn(3, 4, OUT, requires_grad=True)
    upstream = torch.randn(3, 4, IN)
    want = dense(x)
    want_dx, want_dw, want_db = _grads(want, upstream, x, dense.weight, dense.bias)
    x_in = _shard(x.detach(), -1).requires_grad_() if input_is_parallel else x
    got = layer(x_in)
    dx, dw, db = _grads(got, upstream, x_in, layer.weight, layer.bias)
    return {"init_weight": (layer.weight, _shard(dense.weight, 1)), "init_bias": (layer.bias, dense.bias),
            "output": (got, want), "input_grad": (dx, _shard(want_dx, -1) if input_is_parallel else want_dx),
            "weight_grad": (dw, _shard(want_dw, 1)), "bias_grad": (db, want_db)}


def _embedding_case() -> dict:
    torch.manual_seed(2)
    dense = nn.Embedding(VOCAB, IN)
    torch.manual_seed(2)
    layer = VocabParallelEmbedding(VOCAB, IN, group=WORLD())
    ids = torch.tensor([[0, 4, 5, 9], [9, 3, 3, 7]])  # ids on both ranks' slices
    upstream = torch.randn(2, 4, IN)
    want, got = dense(ids), layer(ids)
    (want_dw,) = _grads(want, upstream, dense.weight)
    (dw,) = _grads(got, upstream, layer.weight)
    return {"init_weight": (layer.weight, _shard(dense.weight, 0)), "output": (got, want),
            "weight_grad": (dw, _shard(want_dw, 0))}


def _cross_entropy_case(dtype: torch.dtype) -> dict:
    torch.manual_seed(3)
    logits = (torch.randn(2, 5, VOCAB, dtype=dtype) * 3).requires_grad_()
    labels = torch.tensor([[0, 4, 5, 9, 1], [9, -100, 3, 7, 6]])  # -100: ignored, as by F.cross_entropy
    want = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    (want_grad,) = torch.autograd.grad(want, logits)
    shard = _shard(logits.detach(), -1).requires_grad_()
    got = vocab_parallel_cross_entropy(shard, labels, WORLD())
    (grad,) = torch.autograd.grad(got * 1.7, shard)
    return {"loss": (got, want), "logits_grad": (grad, _shard(want_grad * 1.7, -1))}


def _divisibility_errors() -> list[str]:
    messages = []
    for build in (lambda: ColumnParallelLinear(4, 5, group=WORLD()), lambda: RowParallelLinear(5, 4, group=WORLD()),
                  lambda: VocabParallelEmbedding(7, 4, group=WORLD())):
        try:
            build()
        except ValueError as error:
            messages.append(str(error))
    return messages


def _one_rank_tensor_group() -> dict:
    """pipe=2, tensor=1: ProcessGroups' tensor group is one rank (None); a layer built on it is dense."""
    groups = pg.ProcessGroups(pg.Topology(pipe=2))
    torch.manual_seed(4)
    dense = nn.Linear(IN, OUT)
    torch.manual_seed(4)
    layer = ColumnParallelLinear(IN, OUT, group=groups.tensor_parallel_group)
    x = torch.randn(3, IN)
    return {"init_weight": (layer.weight, dense.weight), "output": (layer(x), dense(x))}


def _all_layer_cases() -> dict:
    cases = {"one_rank_tensor_group": _one_rank_tensor_group(), "column": _column_case(False), "column_gather": _column_case(True),
             "row": _row_case(True), "row_split_input": _row_case(False), "embedding": _embedding_case(),
             "cross_entropy": _cross_entropy_case(torch.float32),
             "cross_entropy_float64": _cross_entropy_case(torch.float64)}
    detached = {name: {k: (a.detach(), b.detach()) for k, (a, b) in case.items()} for name, case in cases.items()}
    return {"cases": detached, "errors": _divisibility_errors()}


@pytest.fixture(scope="module")
def layer_results() -> list[dict]:
    return run_local(_all_layer_cases, 2, timeout_s=60)


@pytest.mark.parametrize("case", ["one_rank_tensor_group", "column", "column_gather", "row", "row_split_input", "embedding",
                                  "cross_entropy", "cross_entropy_float64"])
def test_layer_matches_dense(layer_results, case):
    for rank, result in enumerate(layer_results):
        for quantity, (got, want) in result["cases"][case].items():
            if quantity.startswith("init"):  # the exact slice of the dense initialisation
                assert torch.equal(got, want), f"rank {rank} {case} {quantity} is not the dense slice"
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {case} {quantity}: {m}")


def test_sizes_not_divisible_by_the_group_are_named(layer_results):
    errors = layer_results[0]["errors"]
    assert len(errors) == 3
    assert re.search(r"out_features=5 must be divisible by the tensor-parallel group size 2", errors[0])
    assert re.search(r"in_features=5 must be divisible .* size 2", errors[1])
    assert re.search(r"vocab\)=7 must be divisible .* size 2", errors[2])


# ---- end to end: the TP GPT against the one-process dense GPT -----------------------

GPT_CFG = GPTConfig(vocab_size=16, seq_len=6, n_layer=2, n_head=2, n_embd=8)
MICRO_BATCHES, STEPS = 2, 3
GRIDS = [(1, 1, 0), (2, 1, 0), (1, 2, 1)]  # (pipe, data, zero.stage), all at tensor=2


def _config(pipe: int, data: int, zero: int, grad_clip: float) -> dict:
    return {"topology": {"pipe": pipe, "data": data, "tensor": 2},
            "schedule": {"name": "1f1b", "micro_batches": MICRO_BATCHES}, "zero": {"stage": zero},
            "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
            "precision": {"dtype": "float32"}, "train": {"grad_clip": grad_clip}, "comm": {"timeout_s": 60}}


def _global_batch(step: int, data: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """data x MICRO_BATCHES micro-batches of (ids, labels); data rank d takes slice d."""
    gen = torch.Generator().manual_seed(100 + step)
    shape = (data * MICRO_BATCHES, 2, GPT_CFG.seq_len + 1)
    tokens = torch.randint(0, GPT_CFG.vocab_size, shape, generator=gen)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _state(module: nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """name -> (this rank's tensor, its split dim or None when replicated)."""
    return {re.sub(r"^stages\.\d+\.", "", name): (p.detach().clone(), getattr(p, "partition_dim", None))
            for name, p in module.named_parameters()}


def _train_tensor_parallel(cfg: dict) -> dict:
    groups = pg.init_distributed(cfg)
    model = GPT(GPT_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    engine = pg.initialize(model, cfg, groups=groups)
    data, d = groups.topology.data, groups.coord.data
    losses = [engine.train_batch(iter(_global_batch(step, data)[d * MICRO_BATCHES:(d + 1) * MICRO_BATCHES]))
              for step in range(STEPS)]
    return {"losses": losses, "state": _state(engine.module), "coord": tuple(groups.coord)}


def _train_dense(cfg: dict) -> dict:
    """One process, the same global batch by gradient accumulation."""
    model = GPT(GPT_CFG)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    clip, losses = cfg["train"]["grad_clip"], []
    for step in range(STEPS):
        batch = _global_batch(step, cfg["topology"]["data"])
        total = 0.0
        for ids, labels in batch:
            loss = model.loss_fn(model(ids), labels)  # (B, T, V) logits, all of them
            (loss / len(batch)).backward()
            total += loss.item()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / len(batch))
    return {"losses": losses, "state": {k: v for k, (v, _) in _state(model).items()}}


def _assert_matches_dense(results: list[dict], reference: dict) -> None:
    """Every rank reports the dense losses; each pipe stage's shards, concatenated along
    their split dim, equal the dense parameters (on every data rank)."""
    for result in results:
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{result['coord']} losses: {m}")
    by_stage: dict[tuple[int, int], list[dict]] = {}
    for result in sorted(results, key=lambda r: r["coord"]):  # (pipe, data, tensor): tensor ranks in order
        by_stage.setdefault(result["coord"][:2], []).append(result["state"])
    seen = set()
    for (pipe, data), states in by_stage.items():
        for name, (_, dim) in states[0].items():
            shards = [state[name][0] for state in states]
            full = torch.cat(shards, dim=dim) if dim is not None else shards[0]
            torch.testing.assert_close(full, reference["state"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"(pipe, data)=({pipe}, {data}) parameter {name}: {m}")
            if dim is None:  # replicated: every tensor rank holds the same value
                for shard in shards[1:]:
                    assert torch.equal(shard, shards[0]), f"{name} differs across tensor ranks"
            seen.add(name)
    assert seen == set(reference["state"]), f"parameters never compared: {set(reference['state']) - seen}"


@pytest.mark.parametrize("pipe,data,zero", GRIDS)
def test_tensor_parallel_gpt_trains_like_the_dense_one(pipe, data, zero):
    cfg = _config(pipe, data, zero, grad_clip=0.0)
    results = run_local(_train_tensor_parallel, pipe * data * 2, (cfg,), timeout_s=60)
    _assert_matches_dense(results, _train_dense(cfg))


@pytest.mark.parametrize("pipe,data,zero", GRIDS)
def test_tensor_parallel_gpt_with_grad_clipping(pipe, data, zero):
    cfg = _config(pipe, data, zero, grad_clip=0.05)  # small enough that every step clips
    results = run_local(_train_tensor_parallel, pipe * data * 2, (cfg,), timeout_s=60)
    _assert_matches_dense(results, _train_dense(cfg))
