"""``deepspeed.utils``: RepeatingLoader (a loader that restarts when exhausted), ``logger`` and ``log_dist``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist

__all__ = ["RepeatingLoader", "log_dist", "logger"]

logger = logging.getLogger("pipegrid.compat.deepspeed")


class RepeatingLoader:
    """Iterate ``loader`` forever: start it again whenever it runs out (DeepSpeed's RepeatingLoader)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def log_dist(message: str, ranks: list[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``message`` on the given ranks (all when None or [-1]; rank 0 only is ``ranks=[0]``)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if ranks is None or -1 in ranks or rank in ranks:
        logger.log(level, "[Rank %d] %s", rank, message)
