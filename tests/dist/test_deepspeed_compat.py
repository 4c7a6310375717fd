"""DeepSpeed scripts on pipegrid.

The same DeepSpeed-style script (tests/support/deepspeed_script.py) runs under DeepSpeed 0.19 itself
(CPU, gloo) and under ``pipegrid.compat.deepspeed``: the same starting weights, losses and
learning rates step by step, wherever DeepSpeed is right; where it is not (fp32 clipping on a
pipeline without ZeRO; seed_layers with partition_method="parameters" on Python >= 3.11; the
micro-batch average applied once per stage by DeepSpeed 0.18.3-0.19.2) the tests pin down
DeepSpeed's defect and that pipegrid matches a one-process reference. Skipped,
saying why, when DeepSpeed cannot be imported. The adapter's own surface (DeepSpeedExamples'
AlexNet script, checkpoints, eval, errors) needs no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipegrid.launch import run_local
from tests.support.deepspeed_script import RandomClassification, canonical, launch, layers, reference

REPO = Path(__file__).resolve().parents[2]
BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "steps_per_print": 100}
SGD = {"type": "SGD", "params": {"lr": 0.1}}
CLIP = 0.05
# each case runs 3 steps in both frameworks; "bf16": compared to one bf16 ulp (DeepSpeed sums tied
# gradients in fp32, pipegrid in bf16: a parameter may round the other way)
CASES = {
    "fp32-zero0-adam-warmup-tiedbias-recompute": {"pipe": 2, "tied_bias": True, "config": {
        **BASE, "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
        "pipeline": {"activation_checkpoint_interval": 3},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01,
                                                     "warmup_num_steps": 3, "warmup_type": "linear"}}}},
    "fp32-zero1-adamw-decay-clip": {"pipe": 2, "config": {
        "train_batch_size": 8, "gradient_accumulation_steps": 2, "steps_per_print": 100,
        "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 4, "warmup_num_steps": 2,
                                                          "warmup_max_lr": 0.01}}}},
    "bf16-zero0-sgd-onecycle-clip": {"pipe": 2, "bf16": True, "config": {
        "train_micro_batch_size_per_gpu": 8, "steps_per_print": 100, "bf16": {"enabled": True},
        "gradient_clipping": CLIP, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1,
                                                     "cycle_first_step_size": 2}}}},
    "bf16-zero1-adam-cosine-clip": {"pipe": 2, "bf16": True, "config": {
        "train_micro_batch_size_per_gpu": 8, "steps_per_print": 100, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5, "warmup_num_steps": 2}}}},
    "fp32-zero0-data2-sgd-rangetest-clip": {"pipe": 1, "config": {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 100,
        "gradient_clipping": CLIP, "optimizer": SGD,
        "scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 1}}}},
    "fp32-zero1-data2-adagrad-clip": {"pipe": 1, "config": {
        **BASE, "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP,
        "optimizer": {"type": "Adagrad", "params": {"lr": 0.05}}}},
}
DEFECT = {"pipe": 2, "config": {**BASE, "optimizer": SGD, "gradient_clipping": CLIP}}
# SGD shows a wrong gradient scale (Adam hides a constant one, clipping most of it): no gradient_clipping key
NO_CLIP = {"pipe": 2, "config": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                                 "steps_per_print": 100,
                                 "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}}
CRASH = {"pipe": 2, "partition": "parameters", "may_fail": True, "config": {**BASE, "optimizer": SGD}}
FUSED_ADAM = {  # DeepSpeed's default Adam: its FusedAdam kernel, decoupled weight decay unless adam_w_mode=false
    "fp32-fusedadam-adamw-mode": {"pipe": 2, "config": {
        **BASE, "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1}}}},
    "fp32-fusedadam-l2-mode": {"pipe": 2, "config": {
        **BASE, "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False}}}},
}


def _env() -> dict:
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def deepspeed_importable() -> None:
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        pytest.skip(f"DeepSpeed cannot be imported ({(done.stderr.strip().splitlines() or ['?'])[-1]}); CI installs "
                    "deepspeed==0.19.* with --no-build-isolation")


def _fused_adam_built() -> bool:
    """DeepSpeed JIT-compiles FusedAdam's CPU kernel on first use (minutes on 2 cores): use it if already built
    (where torch.utils.cpp_extension keeps JIT builds)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    flavour = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    folder = Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{flavour}" / "fused_adam"
    return any(folder.glob("fused_adam*.so"))


@pytest.fixture(scope="module")
def side_by_side(deepspeed_importable, tmp_path_factory):
    """Every case under DeepSpeed, then under the adapter: one torchrun job of 2 ranks each."""
    cases = {**CASES, "defect": DEFECT, "crash": CRASH, "no-clip": NO_CLIP,
             "old-gas-hook": {**NO_CLIP, "old_gas_hook": True}, **(FUSED_ADAM if _fused_adam_built() else {})}
    names, specs = list(cases), list(cases.values())
    root = tmp_path_factory.mktemp("side_by_side")
    runs = {flavour: launch(flavour, specs, root / flavour) for flavour in ("deepspeed", "pipegrid")}
    return {name: {flavour: [rank[i] for rank in runs[flavour]] for flavour in runs} for i, name in enumerate(names)}


def _assert_same(theirs: dict, ours: dict, bf16: bool, what: str) -> None:
    for key in theirs["start"]:
        assert torch.equal(theirs["start"][key], ours["start"][key]), f"{what}: initial {key} differs"
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=1e-5, atol=0,
                               msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(torch.tensor(ours["lrs"]), torch.tensor(theirs["lrs"]), rtol=1e-5, atol=0,
                               msg=lambda m: f"{what} learning rates: {m}")
    tol = {"rtol": 2 ** -7, "atol": 2 ** -7} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    assert set(theirs["end"]) == set(ours["end"]), what
    for key in theirs["end"]:
        torch.testing.assert_close(ours["end"][key], theirs["end"][key], **tol,
                                   msg=lambda m: f"{what} parameter {key} after training: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_trains_like_deepspeed(side_by_side, name):
    for rank, (theirs, ours) in enumerate(zip(side_by_side[name]["deepspeed"], side_by_side[name]["pipegrid"])):
        _assert_same(theirs, ours, CASES[name].get("bf16", False), f"{name} rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FUSED_ADAM))
def test_deepspeed_fused_adam_is_torch_adamw_or_adam(side_by_side, name):
    if name not in side_by_side:
        pytest.skip("DeepSpeed's FusedAdam CPU kernel is not built (it JIT-compiles for minutes on first use); "
                    "build it with: DS_ACCELERATOR=cpu python -c 'from deepspeed.ops.op_builder.cpu import "
                    "FusedAdamBuilder; FusedAdamBuilder().load()'")
    for rank, (theirs, ours) in enumerate(zip(side_by_side[name]["deepspeed"], side_by_side[name]["pipegrid"])):
        _assert_same(theirs, ours, False, f"{name} rank {rank}")


@pytest.mark.slow
def test_deepspeed_fp32_clipping_leaves_later_stages_out_of_the_norm(side_by_side):
    """DeepSpeed 0.19, fp32 without ZeRO on 2 stages: the clip coefficient comes from stage 0's gradients
    alone; pipegrid clips by the whole model's norm, as one process does."""
    right = reference(lr=0.1, clip=CLIP, micro_batch=4, gas=2)
    stage0_only = reference(lr=0.1, clip=CLIP, micro_batch=4, gas=2, clip_first_stage_only=True)
    for rank in range(2):
        ours, theirs = side_by_side["defect"]["pipegrid"][rank], side_by_side["defect"]["deepspeed"][rank]
        as64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
        torch.testing.assert_close(as64(ours["losses"]), as64(right["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(as64(theirs["losses"]), as64(stage0_only["losses"]), rtol=1e-5, atol=0)
        for key, value in ours["end"].items():
            torch.testing.assert_close(value, right["end"][str(rank)][key], rtol=1e-5, atol=1e-6)
    assert abs(right["losses"][-1] - stage0_only["losses"][-1]) > 1e-4  # the defect is visible at this clip


def _trains_like(run: dict, reference_run: dict, rank: int, what: str) -> None:
    """``run`` (one rank's results) has the reference's losses and, for that rank's stage, parameters."""
    losses = [torch.tensor(r["losses"], dtype=torch.float64) for r in (run, reference_run)]
    torch.testing.assert_close(*losses, rtol=1e-5, atol=0, msg=lambda m: f"{what} rank {rank} losses: {m}")
    want = reference_run["end"][str(rank)]
    assert run["end"].keys() == want.keys(), what
    for key, value in run["end"].items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{what} rank {rank} parameter {key}: {m}")


@pytest.mark.slow
def test_deepspeed_averages_micro_batches_once_per_pipeline_from_0_19_3(side_by_side):
    """fp32 without ZeRO or clipping, SGD with momentum, 2 stages, 3 micro-batches: pipegrid trains as one
    process, and so does DeepSpeed from 0.19.3. DeepSpeed 0.18.3-0.19.2 divide by gradient_accumulation_steps
    in every stage's output hook, so stage 0's gradients are divided by it twice (issue #8152): restoring that
    hook on the installed DeepSpeed trains as one process whose gradient crossing the cut is divided by 3."""
    right = reference(lr=0.1, clip=0, micro_batch=2, gas=3, momentum=0.9)
    twice = reference(lr=0.1, clip=0, micro_batch=2, gas=3, momentum=0.9, cut_divides_by=3)
    assert abs(right["losses"][-1] - twice["losses"][-1]) > 1e-4  # the defect is visible here
    old = side_by_side["old-gas-hook"]["deepspeed"]
    for rank in range(2):
        ours, theirs = side_by_side["no-clip"]["pipegrid"][rank], side_by_side["no-clip"]["deepspeed"][rank]
        _trains_like(ours, right, rank, "pipegrid")
        _trains_like(theirs, right if theirs["gas_scaled_once"] else twice, rank, "installed DeepSpeed")
        if "error" not in old[rank]:
            assert not old[rank]["gas_scaled_once"]
            _trains_like(old[rank], twice, rank, "DeepSpeed with its 0.18.3-0.19.2 hook")
    if "error" in old[0]:
        pytest.skip(old[0]["error"])


@pytest.mark.slow
def test_deepspeed_seed_layers_with_parameters_partition_crashes_on_python_311(side_by_side):
    """DeepSpeed seeds layer i with base_seed + i where i is a NumPy integer from its partitioner; Python >= 3.11's
    random.seed refuses those. pipegrid builds the same weights as with any other cut."""
    if sys.version_info < (3, 11):
        pytest.skip("random.seed accepts NumPy integers before Python 3.11")
    for rank in range(2):
        assert "The only supported seed types are" in side_by_side["crash"]["deepspeed"][rank]["error"]
    ours = {k: v for rank in side_by_side["crash"]["pipegrid"] for k, v in rank["start"].items()}
    uniform = {k: v for rank in side_by_side["defect"]["pipegrid"] for k, v in rank["start"].items()}
    assert ours.keys() == uniform.keys()
    for key, value in ours.items():
        assert torch.equal(value, uniform[key]), key


# --- the adapter on its own (no DeepSpeed) ------------------------------------------------
def test_deepspeed_examples_alexnet_script_trains(tmp_path):
    """DeepSpeedExamples' pipeline script shape (AlexNet in 2 stages, training_data=, train_batch())."""
    config = tmp_path / "ds_config.json"
    config.write_text('{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 1,'
                      ' "optimizer": {"type": "Adam", "params": {"lr": 0.002}}}')
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "examples" / "deepspeed_pipeline" / "train.py"), "--deepspeed_config", str(config),
               "-p", "2", "--steps", "16", "--images", "32", "--width", "0.25"]
    done = subprocess.run(command, cwd=tmp_path, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^steps: \d+ loss: ([\d.]+)", done.stdout, re.MULTILINE)]
    assert len(losses) == 16, done.stdout[-2000:]  # rank 0 prints each step, as DeepSpeed does
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses  # it learns the 32 images


def _surface(tmp: str) -> dict:
    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe

    deepspeed.init_distributed(dist_backend="gloo")  # joined already: nothing to do
    model = pipe.PipelineModule(layers(pipe), num_stages=2, loss_fn=nn.CrossEntropyLoss(), seed_layers=True,
                                base_seed=3, partition_method="uniform")
    config = {**BASE, "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "gradient_clipping": 1.0,
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4}}, "steps_per_print": 2,
              "wall_clock_breakdown": True, "memory_breakdown": True}
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=config,
                                                                training_data=RandomClassification(size=24))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        losses = [engine.train_batch() for _ in range(2)]
    out = {"first": engine.is_first_stage(), "last": engine.is_last_stage(), "loader": loader is not None,
           "scheduler": type(scheduler).__name__, "optimizer": type(optimizer).__name__,
           "sizes": (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                     engine.gradient_accumulation_steps()), "printed": printed.getvalue()}
    out["loss_type"] = (type(losses[0]).__name__, losses[0].dtype)
    data = RandomClassification(size=8, seed=9)
    batches = [(data.x[i:i + 4], data.y[i:i + 4]) for i in (0, 4)]
    loss, logits = engine.eval_batch(iter(batches), return_logits=True)
    out["eval"] = (float(loss), None if logits is None else tuple(logits.shape))
    engine.save_checkpoint(tmp, client_state={"epoch": 3})
    out["after_save"] = [float(engine.train_batch(iter(batches))) for _ in range(2)]
    out["lr_after"] = engine.get_lr()
    path, client = engine.load_checkpoint(tmp)
    out["loaded"] = (os.path.basename(path), client, engine.global_steps)
    out["resumed"] = [float(engine.train_batch(iter(batches))) for _ in range(2)]
    out["lr_resumed"] = engine.get_lr()
    try:
        engine(torch.zeros(1))
    except RuntimeError as error:
        out["forward"] = str(error)
    return out


def test_engine_surface_eval_and_checkpoints(tmp_path):
    results = run_local(_surface, 2, (str(tmp_path),), timeout_s=120)
    first, last = results
    assert (first["first"], first["last"], last["first"], last["last"]) == (True, False, False, True)
    assert first["loader"] and last["loader"]  # both stages that read data got the repeating loader
    assert first["scheduler"] == "WarmupLR" and first["optimizer"] == "AdamW" and first["sizes"] == (8, 4, 2)
    assert first["loss_type"] == ("Tensor", torch.float32)
    lines = first["printed"].splitlines()  # DeepSpeed's progress lines at steps_per_print, on rank 0 only
    assert re.match(r"steps: 2 loss: [\d.]+ iter time \(s\): [\d.]+ samples/sec: [\d.]+$", lines[0]), lines
    assert re.match(r"time \(ms\) \| forward: [\d.]+ \| backward: [\d.]+ \| send: ", lines[1]), lines
    assert lines[2].startswith("memory (MiB) | parameters: ") and last["printed"] == ""
    assert first["eval"][0] == last["eval"][0] and first["eval"][1] is None and last["eval"][1] == (4, 4)
    assert (tmp_path / "latest").read_text() == "global_step2" and (tmp_path / "global_step2").is_dir()
    for rank in results:
        assert rank["loaded"] == ("global_step2", {"epoch": 3}, 2)
        assert rank["resumed"] == rank["after_save"] and rank["lr_resumed"] == rank["lr_after"]
        assert "Only train_batch() is accessible in pipeline mode" in rank["forward"]


def _layout_weights(pipe_stages: int, seed: int) -> dict:
    from pipegrid.compat.deepspeed import pipe
    from pipegrid.compat.deepspeed.runtime.utils import set_random_seed

    set_random_seed(seed)
    model = pipe.PipelineModule(layers(pipe), num_stages=pipe_stages, loss_fn=nn.CrossEntropyLoss())
    return canonical(model)


def test_without_seed_layers_the_script_seed_decides_and_every_layout_agrees():
    two_stages = run_local(_layout_weights, 2, (2, 7), timeout_s=120)
    one_stage = run_local(_layout_weights, 1, (1, 7), timeout_s=120)[0]
    assert set(two_stages[0]) | set(two_stages[1]) == set(one_stage)
    for stage in two_stages:
        for key, value in stage.items():
            assert torch.equal(value, one_stage[key]), key
    other_seed = run_local(_layout_weights, 1, (1, 8), timeout_s=120)[0]
    assert not torch.equal(other_seed["2.weight"], one_stage["2.weight"])


def _client_pieces() -> dict:
    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe

    model = pipe.PipelineModule(layers(pipe), num_stages=1, loss_fn=nn.CrossEntropyLoss(), seed_layers=True)
    params = [p for p in model.parameters() if p.requires_grad]
    mine = torch.optim.SGD(params, lr=0.3, momentum=0.5)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=mine, model_parameters=params, config={**BASE, "optimizer": {"type": "Lamb"}},
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    data = RandomClassification(size=8)
    engine.train_batch(iter([(data.x[:4], data.y[:4]), (data.x[4:], data.y[4:])]))
    return {"optimizer": (type(optimizer).__name__, optimizer.defaults["momentum"]), "lr": engine.get_lr(),
            "scheduler": type(scheduler).__name__}


def test_client_optimizer_and_scheduler_override_the_config():
    result = run_local(_client_pieces, 1, (), timeout_s=120)[0]
    assert result == {"optimizer": ("SGD", 0.5), "lr": [0.15], "scheduler": "StepLR"}  # the config's Lamb is unused


def test_bad_configs_fail_before_any_process_group(tmp_path):
    import argparse

    import torch.distributed as dist

    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe

    model = pipe.PipelineModule(layers(pipe), num_stages=1, loss_fn=nn.CrossEntropyLoss(), seed_layers=True)
    bad = {**BASE, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
           "optimizer": {"type": "OneBitAdam"}, "amp": {"enabled": True}}
    with pytest.raises(deepspeed.DeepSpeedConfigError, match="3 setting") as info:
        deepspeed.initialize(model=model, config=bad)
    assert len(info.value.problems) == 3 and not dist.is_initialized()
    args = deepspeed.add_config_arguments(argparse.ArgumentParser()).parse_args(["--deepspeed_config", "x.json"])
    with pytest.raises(ValueError, match="both in args.deepspeed_config and in config="):
        deepspeed.initialize(args=args, model=model, config=BASE)
    with pytest.raises(ValueError, match="requires --deepspeed_config"):
        deepspeed.initialize(model=model)
    with pytest.raises(TypeError, match="pipegrid runs pipeline models"):
        deepspeed.initialize(model=nn.Linear(2, 2), config=BASE)
    with pytest.raises(ValueError, match="must provide num_stages or topology"):
        pipe.PipelineModule(layers(pipe))
    with pytest.raises(ValueError, match="seed_fn is not supported"):
        pipe.PipelineModule(layers(pipe), num_stages=1, seed_fn=print)
    assert not dist.is_initialized()


def _fp16_scales(stages: list[int]) -> list[tuple]:
    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe

    out = []
    for stage in stages:
        model = pipe.PipelineModule(layers(pipe), num_stages=1, loss_fn=nn.CrossEntropyLoss(), seed_layers=True)
        config = {**BASE, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage},
                  "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1}}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, training_data=RandomClassification(size=16))
        losses = torch.stack([engine.train_batch() for _ in range(3)])
        out.append((type(engine.scaler).__name__, engine.scaler.scale, engine.skipped_steps,
                    bool(torch.isfinite(losses).all())))
    return out


def test_fp16_follows_deepspeeds_loss_scale_rule():
    """Window 1: DeepSpeed raises the scale after the 2nd and 3rd clean steps (x4); pipegrid's own rule would x8."""
    assert run_local(_fp16_scales, 1, ([0, 1],), timeout_s=120)[0] == [("DeepSpeedLossScaler", 2.0 ** 10, 0, True)] * 2


def _drop_in_zero(zeros: list[dict]) -> list[dict]:
    """Each ``zero_optimization`` through deepspeed.initialize at data=2: losses and parameters."""
    from pipegrid.compat import deepspeed
    from pipegrid.compat.deepspeed import pipe

    out = []
    for zero in zeros:
        model = pipe.PipelineModule(layers(pipe), num_stages=1, loss_fn=nn.CrossEntropyLoss(), seed_layers=True)
        config = {**BASE, "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
                  "zero_optimization": zero, "gradient_clipping": CLIP}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, training_data=RandomClassification(size=32))
        losses = [engine.train_batch().item() for _ in range(3)]
        engine.engine.gather_parameters()  # (ZeRO-3 frees them after each step)
        out.append({"losses": losses, "state": canonical(engine.module)})
    return out


def test_drop_in_zero2_zero3_and_offload_train_like_zero1():
    # DeepSpeed refuses ZeRO-2/3 with a pipeline, so the drop-in's ZeRO-1 is the yardstick
    zeros = [{"stage": 1}, {"stage": 2}, {"stage": 3}, {"stage": 2, "offload_optimizer": {"device": "cpu"}}]
    for rank in run_local(_drop_in_zero, 2, (zeros,), timeout_s=120):
        one = rank[0]
        for zero, other in zip(zeros[1:], rank[1:]):
            torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
            for key, value in one["state"].items():
                torch.testing.assert_close(other["state"][key], value, rtol=1e-6, atol=1e-7,
                                           msg=lambda e, z=zero, k=key: f"{z} {k}: {e}")
