"""Format 1: checkpoints written before optimizer state was keyed by parameter, with one
optimizer file per rank; they load only at the layout that wrote them."""

from __future__ import annotations

import os
from typing import Any

from pipegrid.pipe.checkpoint.files import CheckpointError, legacy_optim_file, load_file
from pipegrid.pipe.zero import OptimizerState
from pipegrid.topology.grid import Coord

__all__ = ["load_format_1"]


def load_format_1(state: OptimizerState, coord: Coord, path: str, previous: str | None, manifest: dict[str, Any],
                  same_layout: bool) -> dict[str, Any]:
    """Load this rank's format-1 optimizer file into ``state``; what it holds besides (the loss
    scale and LR schedule), for the caller to restore."""
    if not same_layout:
        raise CheckpointError(
            f"checkpoint {path} keeps its optimizer state per rank (format 1, written before pipegrid keyed it "
            f"by parameter), which loads only at the layout that wrote it: {manifest['topology']} with "
            f"zero.stage={manifest['zero_stage']}; resume there and save once (the new checkpoint loads at any "
            "layout), or pass load_optimizer_states=False to load the model weights alone")
    name = legacy_optim_file(coord.pipe, coord.data if state.sharded else 0, coord.tensor)
    saved = load_file(os.path.join(path, name), previous)
    state.load_state_dict(saved["zero"])
    return saved
