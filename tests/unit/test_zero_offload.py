"""ZeRO-Offload's code path, one process: the master shard, its gradient and the optimizer
state held apart from the parameters (host memory under CUDA; here host and device are one)
train exactly like the layout without offload, and the memory report moves them to ``*_host``.
The engine turns offload off on a CPU-only run (one notice): tests/dist/test_zero_stages.py."""

from __future__ import annotations

import pytest
import torch

from pipegrid.pipe.zero import Zero2Optimizer, Zero3Optimizer, ZeroOptimizer


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _train(cls: type, dtype: torch.dtype, offload: bool) -> tuple[list[torch.Tensor], dict[str, int]]:
    model = _model(dtype)
    params = list(model.parameters())
    state = cls(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2), None, 1, 0, offload=offload)
    for step in range(3):
        state.gather_params()  # (ZeRO-3: the whole parameters for the step; the others hold them always)
        gen = torch.Generator().manual_seed(step)
        for _ in range(2):  # two micro-batches accumulate
            x = torch.randn(5, 8, generator=gen).to(dtype)
            model(x).square().mean().backward()
            state.weight_grads_done()
        state.reduce_grads()
        state.step(0.5)  # a clipping coefficient
        state.zero_grad()
    memory = state.memory()
    state.gather_params()
    return [p.detach().clone() for p in params], memory


@pytest.mark.parametrize("cls", [ZeroOptimizer, Zero2Optimizer, Zero3Optimizer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_trains_exactly_like_the_device_layout(cls, dtype):
    kept, kept_memory = _train(cls, dtype, offload=False)
    offloaded, memory = _train(cls, dtype, offload=True)
    for a, b in zip(kept, offloaded):
        assert torch.equal(a, b)
    assert memory["optimizer"] == memory["master_weights"] == 0, memory
    assert memory["optimizer_host"] == kept_memory["optimizer"] > 0
    assert memory["master_weights_host"] == memory["gradients_host"] > 0  # fp32 master and its gradient
