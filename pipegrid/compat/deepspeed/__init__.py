"""DeepSpeed's pipeline API over pipegrid: change ``import deepspeed`` to
``from pipegrid.compat import deepspeed`` (and ``from deepspeed.pipe import ...`` to
``from pipegrid.compat.deepspeed.pipe import ...``) and the script trains on pipegrid.

``deepspeed.initialize(model=PipelineModule(...), config=ds_config)`` returns an engine whose
``train_batch`` / ``eval_batch`` / ``save_checkpoint`` / ``load_checkpoint`` delegate to
pipegrid's PipelineEngine; the ds_config is translated key by key with DeepSpeed 0.19's
semantics by :mod:`pipegrid.conf.from_deepspeed` (what cannot be honoured is one error).
DeepSpeed itself is never imported.
"""

from pipegrid.compat.deepspeed import pipe, runtime, utils
from pipegrid.compat.deepspeed.engine import PipelineEngine
from pipegrid.compat.deepspeed.entry import add_config_arguments, init_distributed, initialize
from pipegrid.compat.deepspeed.pipe import PipelineModule
from pipegrid.conf.from_deepspeed import DeepSpeedConfigError

__all__ = ["DeepSpeedConfigError", "PipelineEngine", "PipelineModule", "add_config_arguments", "init_distributed",
           "initialize", "pipe", "runtime", "utils"]
