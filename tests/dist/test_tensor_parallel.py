"""Tensor parallelism on gloo at tensor=2: each layer matches its dense counterpart (init,
forward, gradients). (The TP GPT training like the one-process dense GPT, alone and with
pipe, data and ZeRO-1: tests/dist/test_vs_reference.py.)"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipegrid as pg
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
