"""``save_pretrained(engine, out_dir)``: a directory ``AutoModelForCausalLM.from_pretrained``
loads, written from any pipe x data layout by the stages themselves.

Each pipe rank of data replica 0 writes its own layers as one safetensors shard (split over a
tensor group, the stage's tensor ranks first gather whole tensors and tensor rank 0 writes); rank 0
writes config.json, the shard index and (if given) the tokenizer. Everything goes to a
temporary directory beside ``out_dir`` that is renamed into place once all shards are
written, so an interrupted save leaves no half directory under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipegrid.hf.model import HFCausalLM
from pipegrid.hf.weights import INDEX_FILE, stored_layout
from pipegrid.pipe.engine import PipelineEngine


def shard_name(pipe_rank: int, pipe: int) -> str:
    return f"model-{pipe_rank + 1:05d}-of-{pipe:05d}.safetensors"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: a view into a flat (ZeRO) buffer is copied out, others are not."""
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        out[key] = tensor.contiguous() if whole and tensor.is_contiguous() else tensor.clone()
    return out


def _index(module: HFCausalLM, dtype: torch.dtype) -> dict[str, Any]:
    """The shard index, computed from the skeleton on rank 0 alone (no gathering)."""
    weight_map, total = {}, 0
    for rank, keys in module.hf_shard_keys().items():
        shapes = {key: torch.empty(shape, device="meta") for key, shape in keys}
        for key, tensor in stored_layout(module.skeleton.shell, shapes).items():
            weight_map[key] = shard_name(rank, module.pipe)
            total += tensor.numel() * dtype.itemsize
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _write_metadata(module: HFCausalLM, directory: str, dtype: torch.dtype, tokenizer: Any) -> None:
    config = module.hf_config.__class__.from_dict(module.hf_config.to_dict())
    config.architectures = [module.skeleton.plan.class_name]
    config.dtype = dtype
    config.save_pretrained(directory)
    generation = getattr(module.skeleton.shell, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(_index(module, dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _publish(tmp: str, out_dir: str) -> None:
    """Move a previous ``out_dir`` aside, rename ``tmp`` into place, then delete the old one."""
    old = f"{out_dir}.old-pipegrid"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _layout(target: PipelineEngine | HFCausalLM) -> tuple[HFCausalLM, int, int, bool, bool, torch.dtype]:
    """(module, rank, pipe rank, whether this rank gathers its stage's tensors, whether it writes
    them, dtype) for an engine, or for a one-process model (all stages here, no other process).
    Data replica 0 gathers (each tensor rank takes part); its tensor rank 0 writes."""
    if isinstance(target, HFCausalLM):
        alone = not dist.is_initialized() or dist.get_world_size() == 1
        if target.pipe != 1 or not alone:
            raise TypeError("hf.save_pretrained(model, ...) takes a model only when one process holds all of it; "
                            "pass the engine (pg.initialize's result) to save a pipeline")
        return target, 0, 0, True, True, next(target.parameters()).dtype
    module = getattr(target, "module", None)
    if not isinstance(module, HFCausalLM):
        raise TypeError(f"hf.save_pretrained needs an engine over a pipegrid.hf model (hf.from_pretrained / "
                        f"hf.from_config), got {type(target).__name__} over {type(module).__name__}; use "
                        "engine.save_checkpoint for other models")
    coord = target.groups.coord
    gathers = coord.data == 0
    return module, target.groups.rank, target.pipe_rank, gathers, gathers and coord.tensor == 0, target.dtype


def save_pretrained(engine: PipelineEngine | HFCausalLM, out_dir: str, *, tokenizer: Any = None) -> str:
    """Collective: write the engine's model as a transformers checkpoint directory; its path.

    Weights are saved in the engine's compute dtype (``precision.dtype``), the tied
    embedding once, under the names transformers' own save_pretrained uses. ``tokenizer``
    (anything with ``save_pretrained``) is saved with them. A model that one process
    holds whole (``pipe=1``) may be passed instead of an engine.
    """
    if hasattr(engine, "gather_parameters"):  # ZeRO-3 frees the whole parameters between steps
        engine.gather_parameters()
    module, rank, pipe_rank, gathers, writes, dtype = _layout(engine)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    tmp = os.path.join(parent, f".{name}.tmp-pipegrid")
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    if gathers:
        whole = module.hf_state_dict()  # collective over the tensor group when the stage is split
    if writes:
        tensors = _detached(stored_layout(module.skeleton.shell, whole))
        save_file(tensors, os.path.join(tmp, shard_name(pipe_rank, module.pipe)), metadata={"format": "pt"})
    _barrier()
    if rank == 0:
        _write_metadata(module, tmp, dtype, tokenizer)
        _publish(tmp, out_dir)
    _barrier()
    return out_dir
