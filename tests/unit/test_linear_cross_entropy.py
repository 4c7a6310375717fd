"""The fused LM loss in one process: head + cross-entropy chunked over tokens equals the plain
``F.linear`` + ``F.cross_entropy`` (loss and gradients of the hidden state, weight and bias),
for any chunk size, with ignored labels, under a split backward; the GPT example and
pipegrid.hf models give the same loss and gradients fused and unfused; the config's checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from examples.models.gpt import GPT, tiny_gpt_config
from pipegrid.conf.schema import LossConfig, to_train_config
from pipegrid.pipe.split_backward import backward_input, backward_weight
from pipegrid.tensor import LMHeadInputs, LMLoss, linear_cross_entropy
from pipegrid.tensor.linear_cross_entropy import available_kernel

N_ROWS, SEQ, HIDDEN, VOCAB = 3, 7, 16, 50


def _case(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_ROWS, SEQ, HIDDEN, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(VOCAB, generator=gen, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, VOCAB, (N_ROWS, SEQ), generator=gen)
    labels[0, :3] = -100  # padding
    labels[2, -1] = -100
    return hidden, weight, b, labels


def _plain(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_tokens", [1, 2, 5, 7, 20, 21, 64])  # 21 tokens: odd, exact and larger chunks
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_plain_loss_and_gradients(chunk_tokens, bias):
    hidden, weight, b, labels = _case(bias=bias)
    got = linear_cross_entropy(LMHeadInputs(hidden, weight, b), labels, chunk_tokens=chunk_tokens)
    want = _plain(hidden, weight, b, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(got * 1.3, (hidden, weight, b)), _grads(want * 1.3, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_float64_is_kept_in_float64():
    hidden, weight, b, labels = _case(torch.float64)
    got = linear_cross_entropy(LMHeadInputs(hidden, weight, b), labels, chunk_tokens=4)
    want = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, VOCAB), labels.reshape(-1))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    for g, w in zip(_grads(got, (hidden, weight, b)), _grads(want, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_bfloat16_head_matches_within_bfloat16_rounding():
    hidden, weight, _, labels = _case(torch.bfloat16, bias=False)
    got = linear_cross_entropy(LMHeadInputs(hidden, weight), labels, chunk_tokens=4)
    want = _plain(hidden, weight, None, labels)
    assert got.dtype == torch.float32  # the softmax in float32, as the plain loss's .float()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the same bf16 logits
    for g, w in zip(_grads(got, (hidden, weight)), _grads(want, (hidden, weight))):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=1e-3)  # weight grads summed in fp32 here


def test_ignored_tokens_get_no_loss_and_no_gradient():
    hidden, weight, _, labels = _case(bias=False)
    labels[1] = -100
    loss = linear_cross_entropy(LMHeadInputs(hidden, weight), labels, chunk_tokens=3)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.count_nonzero(grad[1]) == 0
    kept = labels != -100
    torch.testing.assert_close(loss, _plain(hidden[kept], weight, None, labels[kept]))


def test_split_backward_gives_the_whole_backward():
    """zb_h1's I then W on the loss: input gradients first, the head weight's later, the same sums."""
    hidden, weight, b, labels = _case()
    leaf = hidden.detach().requires_grad_()
    loss = linear_cross_entropy(LMHeadInputs(leaf * 2.0, weight, b), labels, chunk_tokens=4)
    (grad_input,), state = backward_input([loss], [None], [leaf], [weight, b])
    assert weight.grad is None and state.deferred_params, "the head's weight gradient waits for W"
    backward_weight(state)
    want = _grads(_plain(hidden * 2.0, weight, b, labels), (hidden, weight, b))
    for g, w in zip((grad_input, weight.grad, b.grad), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_lm_loss_auto_chunks_only_where_it_saves_memory_and_shifts_labels():
    hidden, weight, _, labels = _case(bias=False)
    inputs = LMHeadInputs(hidden, weight)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    auto = LMLoss(LossConfig(chunked="auto", chunk_tokens=labels.numel()), shift_labels=True)
    torch.testing.assert_close(auto(inputs, labels), _plain(hidden, weight, None, shifted))
    assert auto.kernel is None  # one chunk: nothing chunked
    chunked = LMLoss(LossConfig(chunked="true", chunk_tokens=labels.numel()), shift_labels=True)
    torch.testing.assert_close(chunked(inputs, labels), _plain(hidden, weight, None, shifted))
    assert chunked.kernel == "torch"
    logits = inputs.logits().detach()  # heads give logits in evaluation: the plain loss
    torch.testing.assert_close(chunked(logits, labels), _plain(hidden, weight, None, shifted))
    several = LMLoss(LossConfig(chunked="auto", chunk_tokens=4), shift_labels=True)
    torch.testing.assert_close(several(inputs, labels), _plain(hidden, weight, None, shifted))
    assert several.kernel == "torch"  # several chunks of a vocabulary wider than the hidden size
    narrow = LMLoss(LossConfig(chunked="auto", chunk_tokens=4))
    narrow(LMHeadInputs(hidden, weight[:12]), labels.clamp(max=11))
    assert narrow.kernel is None  # 12 classes, hidden 16: the logits are cheap, kept whole


def test_lm_loss_follows_the_engine_config_unless_given_its_own():
    loss = LMLoss()
    assert not loss.fuses()  # a model called on its own keeps its logits
    loss.configure(LossConfig(chunked="auto"))
    assert loss.fuses()
    own = LMLoss(LossConfig(chunked="false"))
    own.configure(LossConfig(chunked="true"))
    assert not own.fuses()


def test_gpt_example_fused_equals_unfused():
    torch.manual_seed(0)
    cfg = tiny_gpt_config(seq_len=16, vocab_size=96)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    labels = ids.roll(-1, dims=1)
    labels[0, -4:] = -100
    results = []
    for chunked in ("false", "true"):
        model = GPT(cfg, loss=LossConfig(chunked=chunked, chunk_tokens=7), seed=5)
        out = model(ids)
        assert isinstance(out, LMHeadInputs) == (chunked == "true")
        loss = model.loss_fn(out, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        with torch.no_grad():
            assert model(ids).shape == (3, cfg.seq_len, cfg.vocab_size)  # evaluation: logits
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name, grad in grads0.items():  # the tied embedding's gradient included (head + input halves)
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied heads
def test_hf_fused_equals_transformers(family, tmp_path):
    pytest.importorskip("transformers")
    from pipegrid import hf
    from tests.support.hf_models import ATTN, load_reference, save_tiny

    directory = save_tiny(family, str(tmp_path))
    reference = load_reference(directory)
    ids = torch.randint(0, reference.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :2] = -100
    want = reference(input_ids=ids, labels=labels).loss
    want.backward()
    model = hf.from_pretrained(directory, attn_implementation=ATTN, loss=LossConfig(chunked="true", chunk_tokens=5))
    got = model.loss_fn(model(ids), labels)
    got.backward()
    assert model.loss_fn.kernel == "torch"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    compared = 0
    for stage in model.stage_ids:  # every gradient, the tied embedding's (input + head halves) included
        for _, layer in model.local_layers(stage):
            for attr, name in layer.hf_names.items():
                for local, param in layer.get_submodule(attr).named_parameters():
                    want_grad = reference.get_parameter(f"{name}.{local}").grad
                    torch.testing.assert_close(param.grad, want_grad, rtol=1e-5, atol=1e-7,
                                               msg=lambda m, key=f"{name}.{local}": f"{key}: {m}")
                    compared += 1
    assert compared >= 10


# gemma2's soft cap of 30 and a scale of 1 + 2^-20 change small logits by less than any tolerance
@pytest.mark.parametrize("family,overrides", [("gemma2", {}), ("granite", {"logits_scaling": 1 + 2 ** -20})])
def test_hf_scaled_or_soft_capped_logits_are_not_fused(family, overrides):
    pytest.importorskip("transformers")
    from pipegrid import hf
    from tests.support.hf_models import ATTN, sweep_config

    config = sweep_config(family, **overrides)
    ids = torch.randint(0, config.vocab_size, (2, 6))
    model = hf.from_config(config, attn_implementation=ATTN, loss=LossConfig(chunked="auto", chunk_tokens=2))
    assert isinstance(model(ids), torch.Tensor)  # auto: the model's own (soft-capped) logits
    strict = hf.from_config(config, attn_implementation=ATTN, loss=LossConfig(chunked="true"))
    with pytest.raises(ValueError, match="loss.chunked=true: .*soft cap.*set loss.chunked=auto"):
        strict(ids)


def test_kernel_is_torch_off_cuda_and_refused_where_it_cannot_run():
    assert available_kernel(torch.device("cpu")) == "torch"
    hidden, weight, _, labels = _case(bias=False)
    with pytest.raises(ValueError, match="runs on CUDA without a tensor group"):
        linear_cross_entropy(LMHeadInputs(hidden, weight), labels, kernel="liger")
    with pytest.raises(ValueError, match="kernel must be one of"):
        linear_cross_entropy(LMHeadInputs(hidden, weight), labels, kernel="triton")
    with pytest.raises(ValueError, match="chunk_tokens must be an integer >= 1"):
        linear_cross_entropy(LMHeadInputs(hidden, weight), labels, chunk_tokens=0)


@pytest.mark.parametrize("value,expected", [(True, "true"), (False, "false"), ("auto", "auto"), ("TRUE", "true")])
def test_loss_config_reads_booleans(value, expected):
    assert to_train_config({"loss": {"chunked": value}}).loss.chunked == expected


@pytest.mark.parametrize("loss,message", [({"chunked": "sometimes"}, "loss.chunked must be one of auto, true, false"),
                                          ({"chunk_tokens": 0}, "loss.chunk_tokens must be an integer >= 1")])
def test_loss_config_refuses_bad_values(loss, message):
    with pytest.raises(ValueError, match=message):
        to_train_config({"loss": loss})
