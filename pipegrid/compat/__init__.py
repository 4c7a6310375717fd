"""Other frameworks' training APIs over pipegrid's engine, so their scripts run with their imports changed.

``from pipegrid.compat import deepspeed`` gives DeepSpeed's pipeline surface
(``deepspeed.initialize``, ``deepspeed.pipe.PipelineModule``, ds_config.json): see
:mod:`pipegrid.compat.deepspeed`. Nothing below ``compat`` imports it.
"""
