"""TensorParallelRNG's fork, nesting, state and checkpoint replay, in one process (``active`` set by
hand: a tensor group of two ranks sets it in tests/dist/test_tensor_parallel_rng.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from pipegrid.tensor import TensorParallelRNG, checkpoint_context

SEED = 5


def _active() -> TensorParallelRNG:
    rng = TensorParallelRNG(seed=SEED, pipe_rank=1)
    rng.active = True
    return rng


def test_seeded_with_megatrons_offsets():
    assert TensorParallelRNG(seed=SEED, pipe_rank=1).seed == SEED + 2718 + 100  # tensor rank 0


def test_fork_draws_its_own_stream_and_the_default_one_continues_untouched():
    rng = _active()
    own = torch.Generator().manual_seed(rng.seed)
    torch.manual_seed(0)
    with rng.fork():
        first = torch.rand(4)
        with rng.fork():  # nested (attention inside a forked block): the same stream goes on
            second = torch.rand(4)
    after = torch.rand(4)
    with rng.fork():
        third = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))
    assert torch.equal(torch.cat([first, second, third]), torch.rand(12, generator=own))


def test_state_round_trips_and_is_not_loaded_inside_a_fork():
    rng = _active()
    state = rng.state_dict()
    with rng.fork():
        drawn = torch.rand(3)
        with pytest.raises(RuntimeError, match="outside the block"):
            rng.load_state_dict(state)
    rng.load_state_dict(state)
    with rng.fork():
        assert torch.equal(torch.rand(3), drawn)


def test_checkpoint_recompute_redraws_the_forward_masks_and_leaves_the_stream_where_it_was():
    rng = _active()

    def block(x: torch.Tensor) -> torch.Tensor:
        with rng.fork():
            return torch.nn.functional.dropout(x, 0.5)

    x = torch.ones(64, requires_grad=True)
    plain = block(x)
    (want,) = torch.autograd.grad(plain.sum(), x)
    rng = _active()  # the same stream again
    out = checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context([rng]))
    assert torch.equal(out, plain)
    with rng.fork():
        torch.rand(10)  # another micro-batch's forward moves the stream on before this backward
    moved = rng.state_dict()["cpu"]
    (got,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(got, want)  # the recompute drew the forward's mask
    assert torch.equal(rng.state_dict()["cpu"], moved)
