"""A transformers checkpoint's safetensors files, read one tensor at a time.

Only headers are read up front (names, shapes, dtypes), so every rank can check the
whole checkpoint against the model before anything is built; a stage then reads just
its own tensors, opening the file for each one, so no more than one tensor of the file
is mapped in at a time (resident memory follows the stage's weights, not the file's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


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
        for file in self.files:
            with safe_open(os.path.join(path, file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.tensors[name] = StoredTensor(file, tuple(view.get_shape()), view.get_dtype())

    def find(self, key: str, base_prefix: str) -> str | None:
        """The stored name of model key ``key``: itself, or without/with the base-model prefix
        (checkpoints of a bare base model, such as the original GPT-2's, lack it)."""
        head = f"{base_prefix}."
        candidates = [key, key[len(head):] if key.startswith(head) else head + key]
        return next((name for name in candidates if name in self.tensors), None)

    def check(self, expected: Iterable[tuple[str, tuple[int, ...]]], base_prefix: str, where: str) -> None:
        """Every expected (key, shape) is stored with that shape; else one error listing them all."""
        missing, wrong = [], []
        for key, shape in expected:
            name = self.find(key, base_prefix)
            if name is None:
                missing.append(key)
            elif self.tensors[name].shape != tuple(shape):
                wrong.append(f"{name}: stored {list(self.tensors[name].shape)}, config.json implies {list(shape)}")
        if wrong:
            raise ValueError(f"hf.from_pretrained: {len(wrong)} tensors of {self.path} disagree with its config.json "
                             f"({where}): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. The weights were "
                             "saved for another configuration: restore the config.json they were saved with")
        if missing:
            raise ValueError(
                f"hf.from_pretrained: {self.path} lacks {len(missing)} tensors that {where} needs, e.g. "
                f"{missing[:3]} (it has e.g. {sorted(self.tensors)[:3]}). A checkpoint whose tensors transformers "
                "converts while loading (per-expert MoE weights, renamed legacy keys) is not read by pipegrid.hf "
                "yet: load it once with AutoModelForCausalLM.from_pretrained and save_pretrained it in the "
                "current layout, or use a complete checkpoint")

    def read_into(self, target: torch.Tensor, key: str, base_prefix: str) -> None:
        """Copy stored tensor ``key`` into ``target`` (casting its dtype), opening the file for it alone."""
        name = self.find(key, base_prefix)
        assert name is not None, f"{key} was checked to be stored"
        with safe_open(os.path.join(self.path, self.tensors[name].file), framework="pt") as handle:
            with torch.no_grad():
                target.copy_(handle.get_tensor(name))


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
