"""Start a job's processes: N local workers when not under torchrun; torchrun's otherwise.

``launch(fn, *args, world_size=N)`` is what an entry point calls (``job.py``); ``run_local``
is the worker pool beneath it, also used by tests and benchmarks (``local.py``);
``hydra_main`` wraps ``hydra.main`` for the packaged configs (``hydra_app.py``).
"""

from pipegrid.launch.hydra_app import hydra_main
from pipegrid.launch.job import launch, start_method_for, torchrun_world_size, uses_cuda
from pipegrid.launch.local import INIT_METHOD_ENV, WORKER_ENV, WorkerError, is_torchrun, run_local

__all__ = ["launch", "run_local", "hydra_main", "WorkerError", "is_torchrun", "torchrun_world_size", "uses_cuda",
           "start_method_for", "INIT_METHOD_ENV", "WORKER_ENV"]
