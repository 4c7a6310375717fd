"""Configuration: the schema dataclasses and, for Hydra entry points, the YAML presets
shipped inside the package (``pkg://pipegrid.conf``, so an installed pipegrid finds them).

- ``schema.py``: :class:`TrainConfig`, what the engine takes (no Hydra needed).
- ``apps.py``: the examples' configs, a TrainConfig plus ``model``/``data`` sections.
- ``store.py``: registers those in Hydra's ConfigStore (imports Hydra).
- ``checks.py``: a composed config -> a checked app dataclass (``+`` keys, cross-section rules).
- ``gpt.yaml``, ``mlp.yaml`` and the groups ``schedule/ model/ optimizer/ precision/ topology/``.
"""
