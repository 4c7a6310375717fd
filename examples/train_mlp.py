"""The smallest pipegrid example: a residual MLP regressor cut into pipeline stages.

    python examples/train_mlp.py                           # 2 local processes (topology=pipe2)
    python examples/train_mlp.py topology=pipe4 schedule=gpipe optimizer=sgd train.steps=300
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` and, uninstalled, pipegrid

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

import pipegrid as pg
from examples.data import regression_batches
from pipegrid.conf.apps import MLPAppConfig
from pipegrid.conf.checks import to_app_config
from pipegrid.launch import hydra_main, launch, torchrun_world_size


class Residual(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)): (B, width) -> (B, width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def mlp(cfg: MLPAppConfig, topology: pg.Topology) -> pg.PipelineModule:
    """Linear in -> depth residual blocks -> Linear out; this process builds only its stage."""
    m = cfg.model
    layers = [pg.LayerSpec(nn.Linear, m.in_features, m.width),
              *[pg.LayerSpec(Residual, m.width) for _ in range(m.depth)],
              pg.LayerSpec(nn.Linear, m.width, 1)]
    return pg.PipelineModule(layers, loss_fn=F.mse_loss, topology=topology, seed=cfg.train.seed,
                             virtual_stages=cfg.schedule.virtual_stages,
                             stage_placement=pg.stage_placement(cfg.schedule))


def train(cfg: MLPAppConfig) -> float:
    """One rank: every rank of a data replica draws the same batch (first stage x, last stage y)."""
    groups = pg.init_distributed(cfg)
    engine = pg.initialize(mlp(cfg, groups.topology), cfg, groups=groups)
    m, data_rank = cfg.schedule.micro_batches, groups.coord.data
    for step in range(1, cfg.train.steps + 1):
        batch = regression_batches(m * cfg.topology.data, cfg.data.micro_batch_size, cfg.model.in_features,
                                   cfg.data.noise, seed=cfg.train.seed + step)
        loss = engine.train_batch(iter(batch[data_rank * m:(data_rank + 1) * m]))
        if groups.rank == 0 and (step == 1 or step % cfg.train.log_interval == 0):
            print(f"step {step}: mse {loss:.4f} (noise floor {cfg.data.noise ** 2:.4f})", flush=True)
    return loss


@hydra_main("mlp")
def main(config: DictConfig) -> float:
    cfg = to_app_config(config, MLPAppConfig, world_size=torchrun_world_size())
    return launch(train, cfg, world_size=cfg.topology.world_size, backend=cfg.comm.backend)


if __name__ == "__main__":
    main()
