"""The engine's own host work per step, as CPU time: pipe=1, 8 tiny residual blocks, 16
micro-batches, so the per-instruction work dominates. CPU time (``time.process_time``), not
wall time, so two checkouts can be compared on a busy machine: run it alternately with
PYTHONPATH pointing at each, and compare medians.

    for t in /path/to/old /path/to/new; do PYTHONPATH=$t python benchmarks/host_cpu_time.py; done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pipegrid as pg  # noqa: E402  (from PYTHONPATH: the checkout being measured)
from gpu_engine import Block  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="append a JSON line here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module = pg.PipelineModule([pg.LayerSpec(Block, 16) for _ in range(8)], loss_fn=nn.functional.mse_loss,
                               topology=pg.Topology(pipe=1))
    engine = pg.initialize(module, {"schedule": {"name": "1f1b", "micro_batches": 16},
                                    "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4}})
    batches = [(torch.randn(2, 16), torch.randn(2, 16)) for _ in range(16)]
    for _ in range(5):  # warm
        engine.train_batch(iter(batches))
    start = time.process_time()
    for _ in range(args.steps):
        engine.train_batch(iter(batches))
    ms = (time.process_time() - start) / args.steps * 1e3
    print(f"{pg.__file__}: {ms:.2f} ms CPU per step")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"pipegrid": pg.__file__, "cpu_ms_per_step": ms}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
