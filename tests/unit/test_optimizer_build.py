"""The engine builds the configured torch optimizer, fused where the config leaves it open."""

import torch

from pipegrid.pipe.optimizer_build import build_optimizer


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def test_fused_kernel_is_the_default_where_torch_has_one():
    for target in ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"):
        assert build_optimizer({"_target_": target, "lr": 0.1}, _params()).defaults["fused"] is True


def test_an_explicit_choice_is_kept():
    spec = {"_target_": "torch.optim.Adam", "lr": 0.1, "fused": False}
    assert not build_optimizer(spec, _params()).defaults["fused"]
    spec = {"_target_": "torch.optim.Adam", "lr": 0.1, "foreach": True}
    assert build_optimizer(spec, _params()).defaults["foreach"] is True


def test_optimizers_without_fused_kernels_are_built_as_configured():
    opt = build_optimizer({"_target_": "torch.optim.RMSprop", "lr": 0.1, "alpha": 0.9}, _params())
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.9


class _NoFusedHere(torch.optim.SGD):
    def __init__(self, params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True requires all the params to be on a supported device")
        super().__init__(params, **kwargs)


def test_a_refused_fused_kernel_falls_back(monkeypatch):
    monkeypatch.setattr(torch.optim, "NoFusedHere", _NoFusedHere, raising=False)
    opt = build_optimizer({"_target_": "torch.optim.NoFusedHere", "lr": 0.1}, _params())
    assert isinstance(opt, _NoFusedHere) and not opt.defaults.get("fused")


def test_fused_and_default_adam_take_the_same_steps():
    torch.manual_seed(0)
    a = _params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = build_optimizer({"_target_": "torch.optim.Adam", "lr": 0.01}, a)
    plain = torch.optim.Adam(b, lr=0.01)
    for step in range(5):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(step)) for p in a]
        for opt, params in ((fused, a), (plain, b)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
