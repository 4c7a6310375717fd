"""The example GPT in one process: shapes, parameter count, FLOPs, and bad configs."""

from __future__ import annotations

import pytest
import torch

import pipegrid as pg
from examples.models.gpt import GPT, GPTConfig, gpt_loss, pad_vocab_size, small_gpt_config, tiny_gpt_config


def test_dense_gpt_shapes_and_loss():
    cfg = tiny_gpt_config(seq_len=16)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    logits = model(ids)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert model(ids[:, :5]).shape == (3, 5, cfg.vocab_size)  # shorter sequences work
    labels = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    loss = model.loss_fn(logits, labels)  # small-init logits: about log(vocab) at the start
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_the_past_does_not_see_the_future():
    model = GPT(tiny_gpt_config(seq_len=16)).eval()
    ids = torch.randint(0, 128, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 128
    torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])


def test_embedding_and_head_are_tied():
    model = GPT(tiny_gpt_config())
    assert list(model.tied_keys()) == ["embed"]
    (weight,) = model.tied_parameters("embed")
    assert weight.shape == (128, 128)
    assert sum(p is weight for p in model.parameters()) == 1


def test_parameter_count_and_flops_match_the_built_model():
    cfg = tiny_gpt_config(n_layer=3)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(non_embedding=False)
    n = cfg.num_parameters()
    assert model.num_flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.num_flops_per_token() * 1000.0 / 1e12)


def test_same_seed_same_model_and_pipeline_stages_build_only_their_layers():
    cfg = tiny_gpt_config()
    a, b = GPT(cfg, seed=7), GPT(cfg, seed=7)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    last = GPT(cfg, topology=pg.Topology(pipe=2), pipe_rank=1)
    assert last.is_last_stage() and len(last.local_layers()) < cfg.n_layer + 4


def test_presets_and_vocab_padding():
    assert small_gpt_config().num_parameters(non_embedding=False) // 10**6 == 14
    assert tiny_gpt_config().num_parameters(non_embedding=False) // 10**5 == 8
    assert tiny_gpt_config(n_layer=1).n_layer == 1
    assert pad_vocab_size(65, 64) == 128 and pad_vocab_size(64, 64) == 64
    small_gpt_config().check_tensor_parallel(4)  # splits 4 ways


@pytest.mark.parametrize("overrides,match", [
    ({"n_embd": 130, "n_head": 4}, r"n_embd=130 must be divisible by n_head=4"),
    ({"n_layer": 0}, r"n_layer must be a positive integer, got 0"),
    ({"vocab_size": 2.5}, r"vocab_size must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt_config(**overrides)


@pytest.mark.parametrize("overrides,match", [
    ({"vocab_size": 127}, r"not multiples of 2: vocab_size=127"),
    ({"n_head": 3, "n_embd": 129}, r"not multiples of 2: n_head=3, n_embd=129;"),
    ({"n_head": 1}, r"not multiples of 2: n_head=1;"),
])
def test_sizes_not_divisible_by_the_tensor_degree_are_named_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPT(tiny_gpt_config(**overrides), topology=pg.Topology(tensor=2))


def test_tensor_parallel_without_its_group_is_refused():
    with pytest.raises(ValueError, match=r"topology.tensor=2 needs the tensor-parallel group.*tensor_group="):
        GPT(tiny_gpt_config(), topology=pg.Topology(tensor=2))


def test_gpt_loss_is_mean_token_cross_entropy():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, 5), labels.reshape(6))
    torch.testing.assert_close(gpt_loss(logits, labels), expected)
    with pytest.raises(ValueError, match="positive integer"):
        GPTConfig(vocab_size=0, seq_len=4, n_layer=1, n_head=1, n_embd=4)


def test_tensor_parallel_layers_are_dense_without_torch_distributed():
    from pipegrid.tensor import ColumnParallelLinear, RowParallelLinear, is_tensor_sharded, vocab_parallel_cross_entropy

    torch.manual_seed(0)
    dense = torch.nn.Linear(4, 6)
    torch.manual_seed(0)
    column, row = ColumnParallelLinear(4, 6, gather_output=True), RowParallelLinear(4, 6, input_is_parallel=False)
    assert torch.equal(column.weight, dense.weight) and is_tensor_sharded(column.weight)
    assert is_tensor_sharded(row.weight) and not is_tensor_sharded(row.bias)  # the bias is replicated
    x = torch.randn(2, 4)
    torch.testing.assert_close(column(x), dense(x))
    assert row.weight.shape == (6, 4) and row(x).shape == (2, 6)
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, -100], [0, 4, 4]])
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, 5), labels.reshape(6))
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, labels), expected)
