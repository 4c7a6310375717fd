"""A stage output whose integer tensor comes before its float one: each received gradient
belongs to a float output, whatever the order in the tuple (the integer one has none)."""

import torch
from torch import nn

import pipegrid as pg
from pipegrid.launch import run_local

WIDTH, STEPS = 8, 3


class MaskFirst(nn.Module):
    """(B, W) -> (mask (B, W) int64, hidden (B, W)): the integer tensor first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x > 0).long(), self.fc(x)


class UseMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mask, h = inputs
        return self.fc(h * mask)


def _batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(4, WIDTH, generator=gen), torch.randn(4, WIDTH, generator=gen)) for _ in range(2)]


def _pipeline() -> list[float]:
    module = pg.PipelineModule([pg.LayerSpec(MaskFirst), pg.LayerSpec(UseMask)], loss_fn=nn.functional.mse_loss,
                               topology=pg.Topology(pipe=2), seed=7)
    engine = pg.initialize(module, {"schedule": {"micro_batches": 2},
                                    "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}})
    return [engine.train_batch(iter(_batches(step))) for step in range(STEPS)]


def _reference() -> list[float]:
    layers = []
    for i, cls in enumerate((MaskFirst, UseMask)):  # layer i under seed + i, as pipegrid builds it
        torch.manual_seed(7 + i)
        layers.append(cls())
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        batch = _batches(step)
        total = 0.0
        for x, y in batch:
            loss = nn.functional.mse_loss(model(x), y)
            (loss / len(batch)).backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / len(batch))
    return losses


def test_an_integer_output_before_a_float_one_trains_like_one_process():
    losses = run_local(_pipeline, 2, timeout_s=60)
    for rank_losses in losses:
        torch.testing.assert_close(rank_losses, _reference(), rtol=1e-6, atol=1e-7)
