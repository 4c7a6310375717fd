"""``deepspeed.runtime.utils.set_random_seed``: seed Python's, NumPy's and torch's generators at once."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["set_random_seed"]


def set_random_seed(seed: int) -> None:
    """Seed ``random``, NumPy and torch as DeepSpeed does (NumPy mod 2**32, torch mod 2**63).

    ``int(seed)`` first: DeepSpeed passes NumPy integers from its partitioner, which
    ``random.seed`` refuses on Python >= 3.11 (its seed_layers + partition_method="parameters" crash).
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed % (2 ** 63))
