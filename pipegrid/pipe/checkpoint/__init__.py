"""Checkpoints: one weights file per layer (by global index), optimizer shards, a manifest.

Weights are keyed by layer and optimizer state by parameter (``<layer>/<name>`` and the
element range each shard file holds, listed in the manifest), whatever pipe rank or ZeRO-1
shard held them, so a checkpoint written at one pipe x data degree, ZeRO on or off,
resumes at any other (same tensor degree): each rank reslices what its own parameters
need. Every save goes to a temporary directory that is renamed into place once all
ranks have written, and ``latest`` is replaced atomically, so an interrupted save
leaves the previous checkpoint whole. Files load with ``weights_only=True``: a
checkpoint carrying pickled objects is refused.

``files`` holds the file I/O, ``engine_state`` what of an engine goes where,
``optimizer_shards`` the per-parameter optimizer state, ``legacy`` the format-1 path.
"""

from pipegrid.pipe.checkpoint.engine_state import (
                                                   Checkpointable,
                                                   TrainingProgress,
                                                   load_engine,
                                                   parameter_keys,
                                                   save_engine,
)
from pipegrid.pipe.checkpoint.files import (
                                                   FORMAT,
                                                   LATEST,
                                                   MANIFEST,
                                                   OPTIMIZER,
                                                   CheckpointError,
                                                   atomic_write_text,
                                                   check_writable,
                                                   latest_step_dir,
                                                   layer_file,
                                                   legacy_optim_file,
                                                   load_file,
                                                   optim_shard_file,
                                                   rank_file,
                                                   read_manifest,
                                                   save_file,
                                                   step_dir_name,
                                                   tied_file,
                                                   whole_checkpoints,
)
from pipegrid.pipe.checkpoint.optimizer_shards import ShardReader

__all__ = ["FORMAT", "LATEST", "MANIFEST", "OPTIMIZER", "CheckpointError", "Checkpointable", "ShardReader",
           "TrainingProgress", "atomic_write_text", "check_writable", "latest_step_dir", "layer_file",
           "legacy_optim_file", "load_engine", "load_file", "optim_shard_file", "parameter_keys", "rank_file",
           "read_manifest", "save_engine", "save_file", "step_dir_name", "tied_file", "whole_checkpoints"]
