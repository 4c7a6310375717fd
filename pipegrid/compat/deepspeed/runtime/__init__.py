"""``deepspeed.runtime``: the pieces DeepSpeed scripts import from it (``runtime.utils.set_random_seed``,
``runtime.lr_schedules``), and the fp16 loss-scale rule the adapter installs."""

from pipegrid.compat.deepspeed.runtime import lr_schedules, utils

__all__ = ["lr_schedules", "utils"]
