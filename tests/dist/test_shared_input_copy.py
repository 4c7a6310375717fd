"""Column-parallel siblings that read one input (q, k, v; gate, up) share one copy of it:
the same gradients as separate copies, with one backward all-reduce instead of one each."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.launch import run_local
from pipegrid.tensor import ColumnParallelLinear, SharedInputCopy


class _Siblings(nn.Module):
    def __init__(self, share: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (ColumnParallelLinear(8, 8, group=dist.group.WORLD) for _ in range(3))
        if share:
            shared = SharedInputCopy(dist.group.WORLD)
            shared.attach(self)
            for layer in (self.q, self.k, self.v):
                layer.input_copy = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q(x) * self.k(x) + self.v(x)).sum()


def _input_grad_and_all_reduces(share: bool) -> tuple[torch.Tensor, int]:
    model = _Siblings(share)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = counted
    try:
        for _ in range(2):  # a second call gets a fresh copy: nothing is held between calls
            model(x).backward()
    finally:
        dist.all_reduce = all_reduce
    assert model.q.input_copy is None or model.q.input_copy._held is None
    return x.grad, len(calls)


def _both() -> tuple:
    return _input_grad_and_all_reduces(False), _input_grad_and_all_reduces(True)


def test_siblings_share_one_all_reduce_of_their_input_gradient():
    for (separate_grad, separate_calls), (shared_grad, shared_calls) in run_local(_both, 2, timeout_s=60):
        torch.testing.assert_close(shared_grad, separate_grad, rtol=1e-6, atol=1e-7)
        assert (separate_calls, shared_calls) == (6, 2)  # per call: three all-reduces, or one
