"""The old name of ``python -m pipegrid.compat.deepspeed.from_config`` (DeepSpeed config -> pipegrid
config), kept so the command keeps working: run as a script it runs that module, nothing else.

The translator lives with the rest of the DeepSpeed layer in :mod:`pipegrid.compat.deepspeed`
(``from_config``, ``config_keys``); import it from there. conf imports nothing from compat.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("pipegrid.compat.deepspeed.from_config", run_name="__main__", alter_sys=True)
