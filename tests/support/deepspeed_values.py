"""DeepSpeed's own answers, computed in a separate process (``python -m tests.support.deepspeed_values``):
JSON requests on stdin, JSON answers on stdout's last line (after ``MARK``). The compat tests
compare pipegrid's with these, so DeepSpeed is imported once, never into the test process.

Requests: ``schedules`` (lr and betas after construction and each step), ``scalers`` (loss
scale after each update, DynamicLossScaler and FP16_Optimizer's rule), ``partitions``
(``partition_balanced``), ``topologies`` (rank maps), ``batches`` (DeepSpeedConfig's trio) and
``signatures`` (each LR schedule's arguments, true where required).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from typing import Any

import torch

MARK = "DEEPSPEED_VALUES "


def _optimizer(kind: str, lr: float) -> torch.optim.Optimizer:
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.zeros(2)
    return torch.optim.Adam([param], lr=lr) if kind == "Adam" else torch.optim.SGD([param], lr=lr, momentum=0.9)


def _record(optimizer: torch.optim.Optimizer) -> dict:
    group = optimizer.param_groups[0]
    return {"lr": float(group["lr"]), "betas": list(group["betas"]) if "betas" in group else None}


def schedule(request: dict) -> list[dict]:
    from deepspeed.runtime import lr_schedules

    optimizer = _optimizer(request["optimizer"], request["lr"])
    scheduler = getattr(lr_schedules, request["type"])(optimizer, **request["params"])
    out = [_record(optimizer)]
    for _ in range(request["steps"]):
        optimizer.step()
        scheduler.step()
        out.append(_record(optimizer))
    return out


def scaler(request: dict) -> list[Any]:
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaleProfile

    args = request["args"]
    if request["kind"] == "dynamic":
        impl = DynamicLossScaler(init_scale=args["init_scale"], scale_window=args["scale_window"],
                                 min_scale=args["min_scale"], delayed_shift=args["delayed_shift"],
                                 consecutive_hysteresis=args["consecutive_hysteresis"],
                                 raise_error_at_min_scale=args["raise_error_at_min_scale"])
        update, current = impl.update_scale, (lambda: impl.cur_scale)
    else:  # FP16_Optimizer._update_scale, on an object holding only its config
        config = LossScaleConfig(torch.float16, dynamic_loss_scale=args["dynamic"],
                                 static_loss_scale=args["init_scale"],
                                 dynamic_loss_args={"init_scale": args["init_scale"],
                                                    "scale_window": args["scale_window"],
                                                    "min_scale": args["min_scale"]},
                                 profile=LossScaleProfile.FUSED)
        holder = types.SimpleNamespace(loss_scale_config=config, verbose=False)
        update, current = (lambda overflow: FP16_Optimizer._update_scale(holder, overflow)), \
            (lambda: config.cur_scale)
    out: list[Any] = []
    for overflow in request["overflows"]:
        try:
            update(overflow)
        except Exception:  # noqa: BLE001 - DeepSpeed raises a bare Exception at the minimum scale
            out.append("raise")
            break
        out.append(current())
    return out


def topology(request: dict) -> dict:
    from deepspeed.runtime.pipe import topology as ds_topology

    topo = getattr(ds_topology, request["cls"])(*request["args"])
    world = topo.world_size()
    return {"comm_lists": {axis: topo.get_axis_comm_lists(axis) for axis in topo.get_axis_names()},
            "coords": [list(topo.get_coord(r)) for r in range(world)],
            "reprs": [topo.get_rank_repr(r) for r in range(world)],
            "pipe0": topo.filter_match(pipe=0), "axis_list": topo.get_axis_list("data", 0),
            "dims": {axis: topo.get_dim(axis) for axis in ("pipe", "data", "model", "bogus")}}


def batch(request: dict) -> Any:
    from deepspeed.runtime.config import DeepSpeedConfig

    mpu = types.SimpleNamespace(get_data_parallel_world_size=lambda: request["data"])
    try:
        config = DeepSpeedConfig(dict(request["config"]), mpu=mpu)
    except (AssertionError, ValueError) as error:
        return {"error": str(error)}
    return [config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps]


def signatures() -> dict[str, dict[str, bool]]:
    import inspect

    from deepspeed.runtime import lr_schedules

    out = {}
    for name in lr_schedules.VALID_LR_SCHEDULES:
        params = inspect.signature(getattr(lr_schedules, name)).parameters.values()
        out[name] = {p.name: p.default is inspect.Parameter.empty for p in params
                     if p.name not in ("optimizer", "last_batch_iteration")}
    return out


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    requests = json.load(sys.stdin)
    import torch.distributed as dist

    import deepspeed
    from deepspeed.runtime.utils import partition_balanced

    with tempfile.TemporaryDirectory() as tmp:  # a one-process group: DeepSpeed's config and scaler ask for ranks
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
        answers = {"schedules": [schedule(r) for r in requests.get("schedules", [])],
                   "scalers": [scaler(r) for r in requests.get("scalers", [])],
                   "partitions": [[int(x) for x in partition_balanced(r["weights"], r["parts"])]
                                  for r in requests.get("partitions", [])],
                   "topologies": [topology(r) for r in requests.get("topologies", [])],
                   "batches": [batch(r) for r in requests.get("batches", [])],
                   "signatures": signatures() if requests.get("signatures") else {}}
        dist.destroy_process_group()
    print(MARK + json.dumps(answers), flush=True)  # DeepSpeed logs to stdout too


if __name__ == "__main__":
    main()
