"""A transformers checkpoint's safetensors files, read one tensor at a time.

Only headers are read up front (names, shapes, dtypes), so every rank can check the
whole checkpoint against the model before anything is built; a stage then reads just
its own tensors, opening the file for each one, so no more than one tensor of the file
is mapped in at a time (resident memory follows the stage's weights, not the file's).
Stored names map to the model's through transformers' own key mapping, both ways.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
READ_BLOCK = 16 * 2**20  # bytes of one tensor mapped in at a time


@dataclass(frozen=True)
class StoredTensor:
    file: str
    shape: tuple[int, ...]
    dtype: str


class CheckpointWeights:
    """The tensors of a checkpoint directory by name: where each lives and its shape."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files = _safetensors_files(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.names: dict[str, str] = {}  # model key -> stored name (see bind)
        self.converted: list[str] = []
        for file in self.files:
            with safe_open(os.path.join(path, file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.tensors[name] = StoredTensor(file, tuple(view.get_shape()), view.get_dtype())

    def bind(self, shell: torch.nn.Module) -> None:
        """Name the stored tensors as ``shell`` names its own, with transformers' key mapping for that
        model (legacy names such as GPT-NeoX's ``embed_out``; a missing or extra base-model prefix)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(shell)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = shell.state_dict()
        self.names, self.converted = {}, []  # converted: tensors transformers combines or splits while loading
        for stored in self.tensors:
            key, pattern = rename_source_key(stored, renamings, converters, shell.base_model_prefix, meta)
            if pattern is not None:
                self.converted.append(stored)
            else:
                self.names.setdefault(key, stored)

    def check(self, expected: Iterable[tuple[str, tuple[int, ...]]], where: str) -> None:
        """Every expected (key, shape) is stored with that shape; else one error listing them all."""
        missing, wrong = [], []
        for key, shape in expected:
            name = self.names.get(key)
            if name is None:
                missing.append(key)
            elif self.tensors[name].shape != tuple(shape):
                wrong.append(f"{name}: stored {list(self.tensors[name].shape)}, config.json implies {list(shape)}")
        if wrong:
            raise ValueError(f"hf.from_pretrained: {len(wrong)} tensors of {self.path} disagree with its config.json "
                             f"({where}): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. The weights were "
                             "saved for another configuration: restore the config.json they were saved with")
        if missing and self.converted:
            raise ValueError(
                f"hf.from_pretrained: {self.path} stores {len(self.converted)} tensors that transformers converts "
                f"while loading {where} (e.g. {self.converted[:2]}: per-expert MoE weights fused into one tensor); "
                "pipegrid.hf reads tensors one by one and does not convert them yet. Use from_config for this "
                "architecture, or a checkpoint stored in the model's own layout")
        if missing:
            raise ValueError(f"hf.from_pretrained: {self.path} lacks {len(missing)} tensors that {where} needs, e.g. "
                             f"{missing[:3]} (it stores e.g. {sorted(self.tensors)[:3]}); the checkpoint is incomplete "
                             "or of another model")

    def read_into(self, target: torch.Tensor, key: str) -> None:
        """Copy the tensor stored for model key ``key`` into ``target`` (casting its dtype).

        Large tensors are read in row blocks of about ``READ_BLOCK`` bytes, the file opened for
        each block: the pages mapped in at any moment stay bounded whatever the tensor's size.
        """
        name = self.names.get(key)
        assert name is not None, f"{key} was checked to be stored"
        stored = self.tensors[name]
        file = os.path.join(self.path, stored.file)
        rows = stored.shape[0] if stored.shape else 1
        row_bytes = max(1, target.numel() // max(rows, 1) * target.element_size())
        step = max(1, READ_BLOCK // row_bytes)
        with torch.no_grad():
            if not stored.shape or rows <= step:
                with safe_open(file, framework="pt") as handle:
                    target.copy_(handle.get_tensor(name))
                return
            for start in range(0, rows, step):
                with safe_open(file, framework="pt") as handle:
                    target[start:start + step].copy_(handle.get_slice(name)[start:start + step])


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


def stored_layout(shell: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (model keys) under the names transformers' save_pretrained stores them by
    (its legacy names, e.g. GPT-NeoX's ``embed_out``), so any transformers version loads them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(shell, tensors)
