"""precision.fp8: refused where it cannot run (naming the fix), and which layers torchao converts.

The float8 numerics run on the CPU through torchao's emulation (precision.fp8_emulate); the
engine against a one-process reference is tests/dist/test_fp8_engine.py."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from pipegrid.conf.schema import PrecisionConfig, to_train_config
from pipegrid.pipe import fp8
from pipegrid.pipe.split_backward import backward_input, backward_weight

torchao = pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'pipegrid[fp8]')")


def _cfg(**precision) -> dict:
    return {"topology": {"pipe": 2, "data": 1, "tensor": 1}, "schedule": {"name": "1f1b", "micro_batches": 2},
            "precision": {"dtype": "bfloat16", "fp8": True, **precision}, "comm": {"backend": "gloo"}}


@pytest.mark.parametrize("precision,match", [
    ({"dtype": "float32", "fp8": True}, r"precision.dtype=bfloat16"),
    ({"dtype": "float16", "fp8": True}, r"got precision.dtype=float16"),
    ({"dtype": "bfloat16", "fp8_recipe": "blockwise"}, r"fp8_recipe must be one of tensorwise, rowwise"),
])
def test_config_refuses_what_fp8_cannot_mean(precision, match):
    with pytest.raises(ValueError, match=match):
        PrecisionConfig(**precision)


def test_cpu_training_is_refused_naming_the_fixes():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*trains on the CPU.*fp8=false.*fp8_emulate=true"):
        fp8.check_fp8(to_train_config(_cfg()))
    fp8.check_fp8(to_train_config(_cfg(fp8_emulate=True)))  # emulation runs anywhere
    fp8.check_fp8(to_train_config({**_cfg(), "precision": {"dtype": "float32"}}))  # off: nothing to check


def test_missing_torchao_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes the import fail as if absent
    with pytest.raises(RuntimeError, match=r'pip install "pipegrid\[fp8\]".*precision.fp8=false'):
        fp8.check_fp8(to_train_config(_cfg(fp8_emulate=True)))


@pytest.mark.parametrize("name,capability,ok", [("NVIDIA A100-SXM4-80GB", (8, 0), False),
                                                ("NVIDIA GeForce RTX 3090", (8, 6), False),
                                                ("NVIDIA L4", (8, 9), True), ("NVIDIA H200", (9, 0), True),
                                                ("NVIDIA B200", (10, 0), True)])
def test_gpus_without_float8_tensor_cores_are_refused_by_name(name, capability, ok):
    if ok:
        fp8.check_float8_gpu(name, capability)
        return
    with pytest.raises(RuntimeError, match=rf"found {name} \(sm_{capability[0]}{capability[1]}\).*fp8=false"):
        fp8.check_float8_gpu(name, capability)


@pytest.mark.parametrize("schedule", ["zb_h1", "zb_v", "dualpipev"])
def test_split_backward_schedules_are_refused_saying_why(schedule):
    cfg = _cfg(fp8_emulate=True)
    cfg["schedule"] = {"name": schedule, "micro_batches": 4}
    with pytest.raises(ValueError, match=rf"schedule.name={schedule}.*backward twice.*1f1b"):
        fp8.check_fp8(to_train_config(cfg))


def test_tensor_parallel_is_refused_saying_why():
    cfg = _cfg(fp8_emulate=True)
    cfg["topology"] = {"pipe": 1, "data": 1, "tensor": 2}
    with pytest.raises(ValueError, match=r"topology.tensor=2.*not nn.Linear.*topology.tensor=1"):
        fp8.check_fp8(to_train_config(cfg))


class _Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.odd = nn.Linear(32, 24)        # 24 is not a multiple of 16: stays bf16
        self.norm = nn.LayerNorm(24)
        self.lm_head = nn.Linear(24, 64)    # the head: stays bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 32) -> (B, 64)
        return self.lm_head(self.norm(self.odd(self.mlp(x))))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_conversion_keeps_the_parameters_and_skips_odd_sizes_and_the_head(recipe):
    stage = _Stage().to(torch.bfloat16)
    before = dict(stage.named_parameters())
    converted = fp8.convert_to_fp8(stage, PrecisionConfig(dtype="bfloat16", fp8=True, fp8_recipe=recipe,
                                                          fp8_emulate=True))
    assert converted == ["mlp.0", "mlp.2"]
    assert {n for n, m in stage.named_modules() if type(m).__name__ == "Float8Linear"} == {"mlp.0", "mlp.2"}
    assert type(stage.odd) is nn.Linear and type(stage.lm_head) is nn.Linear
    after = dict(stage.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # optimizer-safe
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    stage(x).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stage.parameters())


def test_float8_output_differs_from_bf16_but_stays_close():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(torch.bfloat16)
    converted = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(torch.bfloat16)
    converted.load_state_dict(dense.state_dict())
    fp8.convert_to_fp8(converted, PrecisionConfig(dtype="bfloat16", fp8=True, fp8_emulate=True))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    want, got = dense(x).float(), converted(x).float()
    assert not torch.equal(want, got)  # the matmuls really went through float8
    assert (got - want).norm() / want.norm() < 0.1  # e4m3 keeps 3 mantissa bits: a few percent


def test_split_backward_gives_the_same_gradients_but_does_the_backward_twice():
    """Why check_fp8 refuses zb_*: correct gradients, twice the float8 matmuls (see pipegrid/pipe/fp8.py)."""
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).to(torch.bfloat16)
    fp8.convert_to_fp8(stage, PrecisionConfig(dtype="bfloat16", fp8=True, fp8_emulate=True))
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    stage(x).float().square().mean().backward()
    want = [x.grad, *(p.grad.clone() for p in stage.parameters())]
    stage.zero_grad(set_to_none=True)
    x2 = x.detach().requires_grad_()
    (grad_x,), state = backward_input([stage(x2).float().square().mean()], [None], [x2], list(stage.parameters()))
    backward_weight(state)
    for a, b in zip(want, [grad_x, *(p.grad for p in stage.parameters())]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
