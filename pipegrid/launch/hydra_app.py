"""Hydra glue for the entry points: ``hydra_main`` over pipegrid's packaged configs, and the
overrides that keep one output directory per run (other ranks, a re-executed launcher)."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from pipegrid.launch.local import is_torchrun

# Under torchrun every rank runs the entry point; only rank 0 keeps Hydra's output
# directory and log, so a run has one directory (not one per rank).
_OTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra.run.dir=.",
                         "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")


def same_output_dir_overrides() -> list[str]:
    """Overrides that make a re-executed Hydra app reuse this run's output directory."""
    if "hydra" not in sys.modules:
        return []
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep restarts, its first job in the same place
        return [f"hydra.sweep.dir={_override_value(str(hydra_cfg.sweep.dir))}"]
    return [f"hydra.run.dir={_override_value(hydra_cfg.runtime.output_dir)}"]


def _override_value(text: str) -> str:
    """A Hydra command-line value: as is when plain, else single-quoted."""
    if re.fullmatch(r"[\w/.:+~@-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``hydra.main`` over pipegrid's packaged configs (``pkg://pipegrid.conf``, version_base 1.3).

    Also registers the schemas in Hydra's ConfigStore, and under torchrun makes the
    ranks other than 0 write no output directory and no log, so a run has one.
    """
    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def entry() -> Any:
            import hydra

            from pipegrid.conf.store import CONFIG_PATH, register_configs

            register_configs()
            if is_torchrun() and int(os.environ["RANK"]) != 0:
                sys.argv.extend(_OTHER_RANK_OVERRIDES)
            return hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)()
        return entry
    return decorate
