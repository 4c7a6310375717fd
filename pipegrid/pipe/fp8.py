"""Float8 training of a stage's linear layers through torchao (``precision.fp8``).

Each rank converts the ``nn.Linear`` layers of the stages it built into torchao's
``Float8Linear`` (as torchtitan does) before the optimizer sees the parameters; the
parameters themselves stay the same bf16 tensors, so checkpoints, ZeRO and tied layers
see no difference. What cannot run is refused before any process group, naming the fix.

What is left in bf16, and why:

* layers whose in or out features are not multiples of 16 (float8 GEMMs need them);
* the LM head (a Linear named ``lm_head``, ``output`` or ``head``): its logits feed the
  loss directly and float8 there costs accuracy for little speed (torchtitan skips it too);
* anything that is not an ``nn.Linear`` (transformers' GPT-2 uses ``Conv1D``: nothing of it
  is converted, and a warning says so);
* pipegrid.tensor's column/row-parallel layers, which are not ``nn.Linear``: fp8 with
  ``topology.tensor > 1`` is refused rather than silently leaving the big matmuls in bf16.

Split backward (zb_h1, zb_v, dualpipev) is refused: a Float8Linear's backward is one
autograd node that computes the input and the weight gradient together, so I and W would
each run both float8 matmuls (measured: 4 backward matmuls per layer pair in I and 4 in W,
against 2 and 2 in bf16), doubling the backward instead of filling bubbles.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch import nn

from pipegrid.conf.schema import PrecisionConfig, TrainConfig
from pipegrid.schedules.registry import SCHEDULES
from pipegrid.topology.join import local_cuda_device, resolve_backend

__all__ = ["check_float8_gpu", "check_fp8", "convert_to_fp8", "fp8_eligible", "torchao_missing_reason"]

INSTALL_HINT = 'pip install "pipegrid[fp8]" (torchao)'
MIN_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90), Blackwell: float8 tensor cores
HEAD_NAMES = frozenset({"lm_head", "output", "head"})


def torchao_missing_reason() -> str | None:
    """Why torchao's float8 training cannot be imported here, or None when it can."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as error:
        return f"torchao is not installed or broken ({error}); install it with {INSTALL_HINT}"
    return None


def check_float8_gpu(name: str, capability: tuple[int, int]) -> None:
    """Refuse a GPU without float8 tensor cores, naming it."""
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        raise RuntimeError(
            f"precision.fp8=true needs a GPU with float8 tensor cores (sm_89 or newer: L4/L40, H100/H200, "
            f"B200), found {name} (sm_{major}{minor}); set precision.fp8=false (bf16), or "
            "precision.fp8_emulate=true to check the float8 numerics slowly")


def _training_device_type(cfg: TrainConfig) -> str:
    """"cuda" or "cpu": where this rank will train, decided as the engine will (no process group made)."""
    backend = dist.get_backend() if dist.is_initialized() else resolve_backend(cfg.comm.backend)[0]
    return "cuda" if backend == "nccl" else "cpu"


def check_fp8(cfg: TrainConfig) -> None:
    """Refuse ``precision.fp8`` where it cannot run, before any collective; a no-op when it is off."""
    prec = cfg.precision
    if not prec.fp8:
        return
    reason = torchao_missing_reason()
    if reason:
        raise RuntimeError(f"precision.fp8=true: {reason}; or set precision.fp8=false")
    if SCHEDULES[cfg.schedule.name].split_backward:
        raise ValueError(
            f"precision.fp8=true with schedule.name={cfg.schedule.name}: its split backward would run every "
            "Float8Linear's backward twice (torchao computes the input and weight gradients in one autograd "
            "node, so I and W each do both); use schedule.name=1f1b or interleaved_1f1b, or precision.fp8=false")
    if (cfg.topology.tensor or 1) > 1:
        raise ValueError(
            f"precision.fp8=true with topology.tensor={cfg.topology.tensor}: pipegrid.tensor's column/row-"
            "parallel layers are not nn.Linear, so torchao would leave the sharded matmuls in bf16; set "
            "topology.tensor=1 (more pipe or data ranks instead), or precision.fp8=false")
    if prec.fp8_emulate:
        return
    if _training_device_type(cfg) != "cuda":
        raise RuntimeError(
            "precision.fp8=true needs a CUDA GPU (sm_89+), but this rank trains on the CPU (comm.backend "
            f"{cfg.comm.backend} resolves to gloo); run on GPUs, set precision.fp8=false, or "
            "precision.fp8_emulate=true to check the float8 numerics slowly on the CPU")
    device = local_cuda_device()
    check_float8_gpu(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Whether torchao converts ``module`` (named ``fqn`` in its stage): see the module docstring."""
    if not isinstance(module, nn.Linear):
        return False
    if module.in_features % 16 or module.out_features % 16:
        return False
    return fqn.rsplit(".", 1)[-1] not in HEAD_NAMES


def _float8_config(prec: PrecisionConfig):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(prec.fp8_recipe)
    return dataclasses.replace(config, emulate=True) if prec.fp8_emulate else config


def convert_to_fp8(module: nn.Module, prec: PrecisionConfig) -> list[str]:
    """Swap the eligible ``nn.Linear`` layers of ``module`` for Float8Linear in place; their names.

    Parameters are kept (the same tensors), so call this before building the optimizer
    and anything that indexes parameters, as the engine does.
    """
    from torchao.float8 import convert_to_float8_training

    converted: list[str] = []

    def eligible(child: nn.Module, fqn: str) -> bool:
        take = fp8_eligible(child, fqn)
        if take:
            converted.append(fqn)
        return take
    convert_to_float8_training(module, config=_float8_config(prec), module_filter_fn=eligible)
    if not converted:
        logging.getLogger("pipegrid").warning(
            "precision.fp8=true converted no layer of this stage: it has no nn.Linear outside the LM head "
            "with in/out features that are multiples of 16 (other layer types, such as transformers' "
            "Conv1D in GPT-2, are not converted); it trains in bf16")
    return converted
