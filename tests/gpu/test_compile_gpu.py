"""Compiled stages on CUDA (inductor generating Triton): gradients equal eager ones, whole and split
into I and W with the weight matmuls still deferred; bf16 within bf16's rounding."""

from __future__ import annotations

import pytest
import torch

from pipegrid.conf.schema import CompileConfig
from pipegrid.pipe.compile import compile_stages
from pipegrid.pipe.module import PipelineModule
from pipegrid.pipe.split_backward import backward_input, backward_weight
from tests.support.models import Block, mse_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _stage(compiled: bool, split: bool, dtype: torch.dtype) -> PipelineModule:
    from pipegrid.pipe.spec import LayerSpec

    module = PipelineModule([LayerSpec(Block, 64, 4) for _ in range(2)], loss_fn=mse_loss).to("cuda", dtype)
    if compiled:
        compile_stages(module, CompileConfig(enabled=True), split_backward=split)
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("split", [False, True])
def test_compiled_gradients_equal_eager(split, dtype, tol):
    x = torch.randn(4, 32, 64, device="cuda", dtype=dtype)
    mask = torch.ones(32, 32, dtype=torch.bool, device="cuda").tril()
    grads = []
    for compiled in (False, True):
        module = _stage(compiled, split, dtype)
        leaf = x.clone().requires_grad_()
        out, _ = module((leaf, mask))
        params = list(module.parameters())
        if split:
            _, state = backward_input([out], [torch.ones_like(out)], [leaf], params)
            if compiled:  # every Linear weight still waits for W
                linear = [p for name, p in module.named_parameters() if "ln" not in name]
                assert {id(p) for p in linear} <= {id(p) for p in state.deferred_params}
            backward_weight(state)
        else:
            out.backward(torch.ones_like(out))
        grads.append([leaf.grad, *[p.grad for p in params]])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
