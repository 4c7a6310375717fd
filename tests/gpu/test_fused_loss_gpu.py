"""The fused LM loss on CUDA: the chunked torch path and, where installed, Liger's and
cut-cross-entropy's kernels equal the plain head + cross-entropy (skipped without CUDA)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from pipegrid.tensor import LMHeadInputs, linear_cross_entropy
from pipegrid.tensor.linear_cross_entropy import available_kernel

pytestmark = pytest.mark.gpu
KERNELS = [("torch", None), ("liger", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy")]


@pytest.mark.parametrize("kernel,package", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_plain_on_cuda(kernel, package, dtype):
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install pipegrid[gpu])")
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(5000, 256, device="cuda", dtype=dtype, generator=gen) * 0.05).requires_grad_()
    labels = torch.randint(0, 5000, (1000,), device="cuda", generator=gen)
    labels[::7] = -100
    got = linear_cross_entropy(LMHeadInputs(hidden, weight), labels, chunk_tokens=333, kernel=kernel)
    got_grads = torch.autograd.grad(got, [hidden, weight])
    want = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    want_grads = torch.autograd.grad(want, [hidden, weight])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got.float(), want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_kernel_choice_on_cuda():
    expected = "torch"
    for kernel, package in KERNELS[1:]:
        if importlib.util.find_spec(package) is not None:
            expected = kernel
            break
    assert available_kernel(torch.device("cuda")) == expected
