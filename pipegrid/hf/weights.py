"""A transformers checkpoint's safetensors files, read one tensor at a time.

Only headers are read up front (names, shapes, dtypes), so every rank can check the
whole checkpoint against the model before anything is built; a stage then reads just
its own tensors, opening the file for each block of one, so resident memory follows the
stage's weights, not the files'. Stored names map to the model's through transformers'
own key mapping, both ways: renamed legacy keys (GPT-NeoX's ``embed_out``) and tensors
transformers combines while loading (per-expert MoE weights stacked into one) are read
through the same ``WeightRenaming``/``WeightConverter`` objects transformers uses.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK = 16 * 2**20  # bytes of one tensor mapped in at a time
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class _Conversion:
    """Stored tensors transformers turns into one or more model tensors (e.g. experts stacked)."""

    first: str  # the model key transformers files the group under
    converter: Any  # a transformers WeightConverter (a fresh copy per use)
    sources: list[tuple[str, str]]  # (stored name, the converter's source pattern it matched)
    shapes: dict[str, tuple[int, ...]]  # model key -> shape, for every tensor the group produces


class CheckpointWeights:
    """The tensors of a checkpoint directory by name: where each lives and what model key it fills."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files = _safetensors_files(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.names: dict[str, str] = {}  # model key -> stored name (see bind)
        self.conversions: dict[str, _Conversion] = {}  # model key -> the group producing it (see bind)
        self._realised: tuple[str, dict[str, torch.Tensor]] | None = None
        for file in self.files:
            with safe_open(os.path.join(path, file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.tensors[name] = StoredTensor(file, tuple(view.get_shape()), view.get_dtype())

    def bind(self, shell: torch.nn.Module) -> None:
        """Map the stored tensors onto ``shell``'s own keys as transformers' from_pretrained would."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(shell)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        meta, prefix = shell.state_dict(), shell.base_model_prefix
        groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        for stored in sorted(self.tensors, key=dot_natural_key):  # experts in index order, as transformers
            key, pattern = rename_source_key(stored, renamings, converters, prefix, meta)
            if key not in meta and stored in meta:
                key, pattern = rename_source_key(stored, [], [], prefix, meta)
            if pattern is None:
                self.names.setdefault(key, stored)
            else:
                groups.setdefault(key, (by_pattern[pattern], []))[1].append((stored, pattern))
        for first, (converter, sources) in groups.items():
            shapes = {key: tuple(t.shape) for key, t in _convert(converter, first, sources, shell, self._meta).items()}
            conversion = _Conversion(first, converter, sources, shapes)
            self.conversions.update({key: conversion for key in shapes})
        self._shell = shell

    def _meta(self, name: str) -> torch.Tensor:
        stored = self.tensors[name]
        return torch.empty(stored.shape, dtype=_DTYPES.get(stored.dtype, torch.float32), device="meta")

    def shape_of(self, key: str) -> tuple[int, ...] | None:
        if key in self.names:
            return self.tensors[self.names[key]].shape
        return self.conversions[key].shapes[key] if key in self.conversions else None

    def check(self, expected: Iterable[tuple[str, tuple[int, ...]]], where: str) -> None:
        """Every expected (key, shape) is stored with that shape; else one error listing them all."""
        missing, wrong = [], []
        for key, shape in expected:
            stored = self.shape_of(key)
            if stored is None:
                missing.append(key)
            elif stored != tuple(shape):
                name = self.names.get(key, key)
                wrong.append(f"{name}: stored {list(stored)}, config.json implies {list(shape)}")
        if wrong:
            raise ValueError(f"hf.from_pretrained: {len(wrong)} tensors of {self.path} disagree with its config.json "
                             f"({where}): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. The weights were "
                             "saved for another configuration: restore the config.json they were saved with")
        if missing:
            raise ValueError(f"hf.from_pretrained: {self.path} lacks {len(missing)} tensors that {where} needs, e.g. "
                             f"{missing[:3]} (it stores e.g. {sorted(self.tensors)[:3]}); the checkpoint is incomplete "
                             "or of another model")

    @torch.no_grad()
    def read_into(self, target: torch.Tensor, key: str, shard: tuple[Any, int, int] | None = None) -> None:
        """Copy the tensor stored for model key ``key`` into ``target`` (casting its dtype); with
        ``shard`` = (ShardRule, tensor rank, tensor degree) only that rank's slices are read."""
        if key in self.conversions:
            if shard is not None:
                raise RuntimeError(f"{key} is converted while loading (stacked experts); pipegrid.hf does not "
                                   "split converted tensors over a tensor group: set topology.tensor=1")
            target.copy_(self._converted(self.conversions[key])[key])
            return
        name = self.names.get(key)
        assert name is not None, f"{key} was checked to be stored"
        if shard is None:
            self._read_blocks(target, name)
            return
        rule, rank, parts = shard
        rows = target.shape[-1] if rule.transposed and target.dim() == 2 else target.shape[0]
        block_rows = max(1, READ_BLOCK // max(1, target.numel() // max(rows, 1) * target.element_size()))
        file = os.path.join(self.path, self.tensors[name].file)

        def read(index: tuple[slice, ...]) -> torch.Tensor:  # the file opened per block, as _read_blocks does
            with safe_open(file, framework="pt") as handle:
                return handle.get_slice(name)[index]

        rule.copy_slices(target, read, rank, parts, block_rows)

    def release(self) -> None:
        """Drop the last converted group (kept while its sibling tensors are read)."""
        self._realised = None

    def _read_blocks(self, target: torch.Tensor, name: str) -> None:
        """Large tensors are read in row blocks of about ``READ_BLOCK`` bytes, the file opened for
        each block: the pages mapped in at any moment stay bounded whatever the tensor's size."""
        stored = self.tensors[name]
        file = os.path.join(self.path, stored.file)
        rows = stored.shape[0] if stored.shape else 1
        step = max(1, READ_BLOCK // max(1, target.numel() // max(rows, 1) * target.element_size()))
        if not stored.shape or rows <= step:
            with safe_open(file, framework="pt") as handle:
                target.copy_(handle.get_tensor(name))
            return
        for start in range(0, rows, step):
            with safe_open(file, framework="pt") as handle:
                target[start:start + step].copy_(handle.get_slice(name)[start:start + step])

    def _read_whole(self, name: str) -> torch.Tensor:
        with safe_open(os.path.join(self.path, self.tensors[name].file), framework="pt") as handle:
            return handle.get_tensor(name).clone()  # the file's mapping goes with the handle

    def _converted(self, conversion: _Conversion) -> dict[str, torch.Tensor]:
        if self._realised is None or self._realised[0] != conversion.first:
            self._realised = None  # one group in memory at a time
            tensors = _convert(conversion.converter, conversion.first, conversion.sources, self._shell,
                               self._read_whole)
            self._realised = (conversion.first, tensors)
        return self._realised[1]


def _convert(converter: Any, first: str, sources: list[tuple[str, str]], shell: torch.nn.Module,
             load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' own conversion of the stored ``sources`` into model tensors (keyed by model key)."""
    converter = copy.deepcopy(converter)  # it collects tensors: one instance per group, as transformers does
    for stored, pattern in sources:
        converter.add_tensor(first, stored, pattern, load(stored))
    with torch.no_grad():
        produced = converter.convert(first, model=shell, config=shell.config)
    return {key: value[0] if isinstance(value, list) else value for key, value in produced.items()}


def stored_layout(shell: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (model keys) under the names and layout transformers' save_pretrained stores them
    by (legacy names, per-expert tensors), so any transformers version loads them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(shell, tensors)


def _safetensors_files(path: str) -> list[str]:
    """The checkpoint's .safetensors files: those its index names, else all in the directory."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"hf.from_pretrained: cannot read {index}: {error!r}") from None
        absent = [file for file in files if not os.path.isfile(os.path.join(path, file))]
        if absent:
            raise ValueError(f"hf.from_pretrained: {index} names files that are not in {path}: {absent[:3]}; "
                             "the download or copy is incomplete")
        return files
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f" (found {others[:3]})" if others else ""
        raise ValueError(f"hf.from_pretrained: {path} has no .safetensors files{found}; pipegrid.hf reads "
                         "safetensors only. Convert once with AutoModelForCausalLM.from_pretrained(path)"
                         ".save_pretrained(new_path), which writes safetensors")
    return files
