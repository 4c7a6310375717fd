"""TensorParallelRNG on CUDA: the fork swaps the current device's generator too, dropout on CUDA
tensors draws from the stream, and checkpoint recompute redraws the forward's masks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from pipegrid.tensor import TensorParallelRNG, checkpoint_context

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _active() -> TensorParallelRNG:
    rng = TensorParallelRNG(seed=5)
    rng.active = True  # a one-process stand-in for a tensor group of two ranks
    return rng


def test_cuda_dropout_draws_the_stream_and_the_device_generator_continues():
    rng = _active()
    x = torch.ones(4096, device="cuda")
    torch.cuda.manual_seed(0)
    with rng.fork():
        forked = torch.nn.functional.dropout(x, 0.5)
    after = torch.nn.functional.dropout(x, 0.5)
    torch.cuda.manual_seed(0)
    assert torch.equal(after, torch.nn.functional.dropout(x, 0.5))  # as if the fork drew nothing
    assert not torch.equal(forked, after)
    again = TensorParallelRNG(seed=5)
    again.active = True
    with again.fork():
        assert torch.equal(torch.nn.functional.dropout(x, 0.5), forked)  # the stream is its seed's
    assert "cuda" in rng.state_dict()


def test_cuda_recompute_redraws_the_forward_masks():
    rng = _active()

    def block(x: torch.Tensor) -> torch.Tensor:
        with rng.fork():
            return torch.nn.functional.dropout(x, 0.5)

    x = torch.ones(4096, device="cuda", requires_grad=True)
    out = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context([rng]))
    with rng.fork():
        torch.rand(10, device="cuda")  # the stream moves on before backward
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, (out != 0).float() * 2.0)
