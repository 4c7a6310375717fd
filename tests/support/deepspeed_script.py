"""One DeepSpeed-style training script, run under DeepSpeed itself and under pipegrid's adapter.

    torchrun --standalone --nproc-per-node 2 -m tests.support.deepspeed_script {deepspeed|pipegrid} CASES.json OUT/

``train(ds, pipe, case)`` is the script body: it only touches the ``deepspeed`` and
``deepspeed.pipe`` modules it is given, so the two runs differ in their imports alone
(``worker``). The model mixes what DeepSpeed's own example mixes: LayerSpecs, a built
module, a plain lambda, plus a tied layer on both stages and dropout (seed_layers reseeds
it per layer and micro-batch). ``reference`` is a one-process plain-torch run of the same
training for the checks that need ground truth. A case with ``old_gas_hook`` runs under DeepSpeed
only, with the gradient-accumulation hook DeepSpeed 0.18.3-0.19.2 put on every stage (``_on_deepspeed``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

BASE_SEED = 11
STEPS = 3
IN, HID, CLASSES = 16, 32, 4


class RandomClassification(Dataset):
    """FakeData-like: ``size`` random feature vectors with random labels, the same for every rank."""

    def __init__(self, size: int = 64, dtype: torch.dtype = torch.float32, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, IN, generator=g).to(dtype)
        self.y = torch.randint(0, CLASSES, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def layers(pipe: Any, tied_bias: bool = False, dropout: float = 0.1) -> list:
    """Eight layers, four per stage at pipe=2 (partition_method='uniform'): 'proj' tied across the cut
    (its weight; a bias, when asked for, is each stage's own in DeepSpeed)."""
    return [pipe.TiedLayerSpec("proj", nn.Linear, IN, IN, bias=tied_bias),
            nn.ReLU(),
            pipe.LayerSpec(nn.Linear, IN, HID),
            pipe.LayerSpec(nn.Dropout, dropout),
            lambda x: torch.tanh(x),
            pipe.LayerSpec(nn.Linear, HID, IN),
            pipe.TiedLayerSpec("proj", nn.Linear, IN, IN, bias=tied_bias),
            pipe.LayerSpec(nn.Linear, IN, CLASSES)]


def canonical(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by global layer index ("5.weight", "tied_modules.proj.weight") in either framework."""
    return {re.sub(r"^stages\.\d+\.layers\.", "", n): p.detach().float().clone() for n, p in module.named_parameters()}


def train(ds: Any, pipe: Any, case: dict) -> dict:
    """The DeepSpeed-shaped script: init, seed, PipelineModule, initialize(training_data=...), train_batch()."""
    ds.init_distributed(dist_backend="gloo")
    ds.runtime.utils.set_random_seed(1234)
    model = pipe.PipelineModule(layers=layers(pipe, case.get("tied_bias", False)), loss_fn=nn.CrossEntropyLoss(),
                                num_stages=case["pipe"],
                                seed_layers=True, base_seed=BASE_SEED,
                                partition_method=case.get("partition", "uniform"))
    start = canonical(model)
    bf16 = case["config"].get("bf16", {}).get("enabled", False)
    engine, _, _, _ = ds.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                    training_data=RandomClassification(dtype=torch.bfloat16 if bf16 else torch.float32),
                                    config=copy.deepcopy(case["config"]))
    losses, lrs = [], []
    for _ in range(case.get("steps", STEPS)):
        losses.append(float(engine.train_batch()))
        lrs.append(engine.get_lr()[0])
    return {"losses": losses, "lrs": lrs, "start": start, "end": canonical(model)}


def worker(flavour: str, cases: list[dict]) -> list[dict]:
    """Run every case in this process; ``flavour`` picks the framework, i.e. the imports."""
    if flavour == "deepspeed":
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed
        import deepspeed.pipe

        # its CPU backend JIT-builds a shared-memory all-reduce used only by inference (minutes on 2 cores)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return [_on_deepspeed(deepspeed, deepspeed.pipe, case) for case in cases]
    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe as compat_pipe

    return [{"skipped": "a DeepSpeed-only case"} if case.get("old_gas_hook") else _attempt(deepspeed, compat_pipe, case)
            for case in cases]


def _on_deepspeed(ds: Any, pipe: Any, case: dict) -> dict:
    """A case under DeepSpeed, noting in ``gas_scaled_once`` whether the micro-batch average (1/gas) reached each
    stage's gradients once. From 0.18.3 an output hook on each stage divides the gradient arriving there by gas;
    until 0.19.2 every stage's did, so each earlier stage divided again what the next one had sent back
    (DeepSpeed issue #8152); from 0.19.3 ``PipelineEngine`` overrides the hook and only the last stage divides.
    ``old_gas_hook``: run with the base engine's hook on every stage again, as 0.18.3-0.19.2 did."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    name = "_backward_prologue_per_tensor"
    hooked, own = hasattr(DeepSpeedEngine, name), vars(PipelineEngine).get(name)
    old = bool(case.get("old_gas_hook"))
    if old and not hooked:
        return {"error": "this DeepSpeed predates the output hooks (0.18.3): there is no old hook to restore"}
    if old and own is not None:
        setattr(PipelineEngine, name, getattr(DeepSpeedEngine, name))
    try:
        result = _attempt(ds, pipe, case)
    finally:
        if old and own is not None:
            setattr(PipelineEngine, name, own)
    return {**result, "gas_scaled_once": not hooked or (own is not None and not old)}


def _attempt(ds: Any, pipe: Any, case: dict) -> dict:
    """A case marked ``may_fail`` reports its error instead of ending the run (DeepSpeed's known crashes)."""
    if not case.get("may_fail"):
        return train(ds, pipe, case)
    try:
        return train(ds, pipe, case)
    except Exception as error:  # noqa: BLE001 - reported to the test, which names what it expects
        return {"error": f"{type(error).__name__}: {error}"}


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _Reference(nn.Module):
    """The eight layers in one process, built and run with DeepSpeed's seed_layers rule."""

    def __init__(self, tied_bias: bool = False) -> None:
        super().__init__()
        built: list[Any] = []
        for i, layer in enumerate(layers(_PlainSpecs, tied_bias)):
            _seed(BASE_SEED + i)
            if i == 6:  # DeepSpeed's tied copy: its own bias (from this seed), the first use's weight
                built.append(layer())
                built[6].weight = built[0].weight
            else:
                built.append(layer() if isinstance(layer, _Build) else layer)
        self.funcs = built
        self.mods = nn.ModuleList([m for m in built if isinstance(m, nn.Module)])  # the shared weight once
        self.calls = 0
        self.cut_divides_by = 1  # the gradient into layer 3's output (a 2-stage cut) is divided by this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for i, f in enumerate(self.funcs):
            _seed(BASE_SEED * (self.calls + 1) + i)
            x = f(x)
            if i == 3 and self.cut_divides_by != 1:
                x.register_hook(lambda grad: grad / self.cut_divides_by)
        return x


class _Build:
    def __init__(self, cls: type, *args: Any, **kwargs: Any) -> None:
        self.cls, self.args, self.kwargs = cls, args, kwargs

    def __call__(self) -> nn.Module:
        return self.cls(*self.args, **self.kwargs)


class _PlainSpecs:
    """Stands in for ``deepspeed.pipe`` so ``layers()`` yields plain builders for the reference."""

    @staticmethod
    def LayerSpec(cls: type, *args: Any, **kwargs: Any) -> _Build:  # noqa: N802 - deepspeed.pipe's name
        return _Build(cls, *args, **kwargs)

    @staticmethod
    def TiedLayerSpec(key: str, cls: type, *args: Any, **kwargs: Any) -> _Build:  # noqa: N802
        return _Build(cls, *args, **kwargs)


def reference(lr: float, clip: float, micro_batch: int, gas: int, steps: int = STEPS,
              clip_first_stage_only: bool = False, tied_bias: bool = False, momentum: float = 0.0,
              cut_divides_by: int = 1) -> dict:
    """SGD (with ``momentum``) in one process, clipping at ``clip`` (0: none, as DeepSpeed's gradient_clipping).
    ``clip_first_stage_only``: the clip coefficient from the norm of layers 0-3 alone (what DeepSpeed 0.19
    computes on a 2-stage fp32 pipeline without ZeRO). ``cut_divides_by``: the gradient crossing a 2-stage
    cut (into layer 3's output) divided by this, as DeepSpeed 0.18.3-0.19.2 do with gradient_accumulation_steps."""
    model = _Reference(tied_bias)
    model.cut_divides_by = cut_divides_by
    start = {k: v for k, v in _named(model).items()}
    data = RandomClassification()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses, position = [], 0
    for _ in range(steps):
        total = 0.0
        for _ in range(gas):
            x, y = data.x[position:position + micro_batch], data.y[position:position + micro_batch]
            position += micro_batch
            loss = nn.functional.cross_entropy(model(x), y)
            (loss / gas).backward()
            total += loss.item()
        if clip:
            first = [p for i, f in enumerate(model.funcs[:4]) if isinstance(f, nn.Module) for p in f.parameters()]
            counted = first if clip_first_stage_only else list(model.parameters())
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in counted]))
            coef = min(1.0, clip / (norm.item() + 1e-6))
            for p in model.parameters():
                p.grad.mul_(coef)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / gas)
    return {"losses": losses, "start": start, "end": _named(model)}


def _named(model: _Reference) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters as each stage of a 2-stage pipeline names them: stage 1's tied copy has its own bias."""
    stages: dict[str, dict[str, torch.Tensor]] = {"0": {}, "1": {}}
    for i, f in enumerate(model.funcs):
        for n, p in (f.named_parameters() if isinstance(f, nn.Module) else ()):
            name = f"tied_modules.proj.{n}" if i in (0, 6) else f"{i}.{n}"
            stages["0" if i < 4 else "1"][name] = p.detach().clone()
    return stages


def launch(flavour: str, cases: list[dict], out: Path, nproc: int = 2, timeout_s: float = 600) -> list[list[dict]]:
    """Run ``worker(flavour, cases)`` on ``nproc`` torchrun ranks; every rank's results, in rank order.

    torchrun, not pipegrid's forked launcher: DeepSpeed's data loader starts worker processes,
    which daemonic forked workers may not. ``--standalone`` picks a free port.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tests.support.deepspeed_script", flavour, str(out / "cases.json"), str(out)]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{flavour} run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-6000:]}")
    return [torch.load(out / f"rank_{rank}.pt", weights_only=True) for rank in range(nproc)]


def main(argv: list[str]) -> None:
    flavour, cases_path, out = argv
    results = worker(flavour, json.loads(Path(cases_path).read_text()))
    torch.save(results, Path(out) / f"rank_{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
