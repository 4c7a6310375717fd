"""Registers the schemas in Hydra's ConfigStore so the packaged YAML (``pkg://pipegrid.conf``)
is composed onto dataclasses: a misspelt key or a wrong type fails inside Hydra.

The primary configs ``gpt.yaml`` and ``mlp.yaml`` list ``gpt_schema`` / ``mlp_schema``
as their first default; call :func:`register_configs` before composing them.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from pipegrid.conf.apps import GPTAppConfig, MLPAppConfig

CONFIG_PATH = "pkg://pipegrid.conf"
"""Where Hydra finds the packaged YAML groups, installed or in a checkout."""
SCHEMAS: dict[str, type] = {"gpt": GPTAppConfig, "mlp": MLPAppConfig}
"""Primary config name -> the dataclass that checks it."""


def register_configs() -> None:
    """Store each app schema as ``<name>_schema`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
