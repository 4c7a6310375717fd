"""The data loader ``deepspeed.initialize(training_data=...)`` builds for a pipeline, as DeepSpeed does.

A DistributedSampler over the data-parallel ranks (no shuffling), batches of
``train_micro_batch_size_per_gpu``, ``dataloader_drop_last``, repeated forever. DeepSpeed also
starts 2 worker processes and pins memory; here batches load in the rank's own process (the same
batches in the same order), pinned only when CUDA is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from pipegrid.compat.deepspeed.utils import RepeatingLoader

__all__ = ["build_data_loader"]


def build_data_loader(dataset: Dataset, micro_batch_size: int, data_rank: int, data_size: int,
                      drop_last: bool = False, collate_fn: Callable[[list], Any] | None = None) -> RepeatingLoader:
    """Micro-batches of ``dataset`` for data rank ``data_rank`` of ``data_size``, repeating forever."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"training_data must be a map-style torch Dataset (with __len__), got "
                        f"{type(dataset).__name__}; DeepSpeed's pipeline engine samples it with a "
                        "DistributedSampler too. Pass an iterator to engine.train_batch(data_iter) instead")
    sampler = DistributedSampler(dataset, num_replicas=data_size, rank=data_rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                        drop_last=drop_last, num_workers=0, pin_memory=torch.cuda.is_available())
    return RepeatingLoader(loader)
