"""The ds_config translator as commands and imports, in subprocesses: its old command name
still works, and nothing below ``pipegrid.compat`` imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120, check=False)


def test_the_command_and_its_old_name_print_the_same(tmp_path):
    """``python -m pipegrid.compat.deepspeed.from_config``, and ``pipegrid.conf.from_deepspeed`` (the old
    name, a shim): the same output and exit codes, and no warning (the package does not import the
    module before it runs as __main__)."""
    path, bad = REPO / "examples" / "deepspeed_pipeline" / "ds_config.json", tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()),
                               "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    runs = {module: [_command(module, str(config), "--world-size", "2", "--pipe", "2") for config in (path, bad)]
            for module in ("pipegrid.compat.deepspeed.from_config", "pipegrid.conf.from_deepspeed")}
    new, old = runs.values()
    assert [r.returncode for r in new] == [r.returncode for r in old] == [0, 2]
    assert new[0].stdout == old[0].stdout and "# Hydra overrides" in new[0].stdout
    assert new[0].stderr == old[0].stderr == "", new[0].stderr
    assert new[1].stderr == old[1].stderr and "zero_optimization.offload_param" in new[1].stderr
    assert "usage: python -m pipegrid.compat.deepspeed.from_config" in _command("pipegrid.conf.from_deepspeed").stderr


def test_layers_below_compat_do_not_import_it():
    """conf, pipe, topology and schedules (every module) load without pipegrid.compat; the translator
    loads without any engine."""
    below = """if True:
        import importlib, pkgutil, sys
        import pipegrid.conf, pipegrid.pipe, pipegrid.schedules, pipegrid.topology
        for package in (pipegrid.conf, pipegrid.pipe, pipegrid.schedules, pipegrid.topology):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        compat = sorted(m for m in sys.modules if m.startswith("pipegrid.compat"))
        assert not compat, compat
    """
    translator = """if True:
        import sys
        import pipegrid.compat.deepspeed.from_config
        engines = sorted(m for m in sys.modules if m.endswith(".engine"))
        assert not engines, engines
    """
    for code in (below, translator):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
