#!/usr/bin/env python3
"""DeepSpeed's pipeline-parallel example (AlexNet in 2 stages, CIFAR-10-sized images) on pipegrid.

It has the shape of DeepSpeedExamples' training/pipeline_parallelism/train.py: argparse with
``deepspeed.add_config_arguments``, ``deepspeed.init_distributed``, a ``PipelineModule`` over the
network's layers (its ``features``, a lambda that flattens, its ``classifier``), and
``deepspeed.initialize(args=..., training_data=...)`` then ``engine.train_batch()``. Only the
three ``deepspeed`` imports differ from a DeepSpeed script. Nothing is downloaded: the data are
random images with random labels (like torchvision's FakeData), which the model learns by heart.

    torchrun --nproc-per-node 2 examples/deepspeed_pipeline/train.py \\
        --deepspeed_config examples/deepspeed_pipeline/ds_config.json -p 2 --steps 20
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import Dataset

from pipegrid.compat import deepspeed  # was: import deepspeed
from pipegrid.compat.deepspeed.pipe import PipelineModule  # was: from deepspeed.pipe import PipelineModule


class AlexNet(nn.Module):
    """AlexNet for 32x32 images: five convolutions, then three linear layers (``width`` scales them)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        c = [max(1, int(n * width)) for n in (64, 192, 384, 256, 256, 1024)]
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, c0, 16, 16)
            nn.MaxPool2d(kernel_size=2),                                                   # (B, c0, 8, 8)
            nn.Conv2d(c[0], c[1], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),                                                   # (B, c1, 4, 4)
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),                                                   # (B, c4, 2, 2)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c[4] * 2 * 2, c[5]), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(c[5], c[5]), nn.ReLU(inplace=True),
            nn.Linear(c[5], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, num_classes)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class FakeImages(Dataset):
    """``size`` random 3x32x32 images with random labels in [0, num_classes), the same on every rank."""

    def __init__(self, size: int = 512, num_classes: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="AlexNet, pipeline parallel")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed by a launcher")
    parser.add_argument("-s", "--steps", type=int, default=100, help="quit after this many steps")
    parser.add_argument("-p", "--pipeline-parallel-size", type=int, default=2, help="pipeline stages")
    parser.add_argument("--backend", type=str, default="nccl" if torch.cuda.is_available() else "gloo",
                        help="distributed backend")
    parser.add_argument("--seed", type=int, default=1138, help="PRNG seed")
    parser.add_argument("--images", type=int, default=512, help="size of the (random) training set")
    parser.add_argument("--width", type=float, default=1.0, help="scale AlexNet's channels and hidden sizes")
    parser.add_argument("--dropout", type=float, default=0.5, help="AlexNet's dropout probability")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def join_layers(net: AlexNet) -> list:
    """The network as a flat list of layers: what PipelineModule cuts into stages."""
    return [*net.features, net.avgpool, lambda x: torch.flatten(x, 1), *net.classifier]


def train_pipe(args: argparse.Namespace, part: str = "parameters") -> None:
    torch.manual_seed(args.seed)
    deepspeed.runtime.utils.set_random_seed(args.seed)
    net = AlexNet(num_classes=10, width=args.width, dropout=args.dropout)
    net = PipelineModule(layers=join_layers(net), loss_fn=nn.CrossEntropyLoss(),
                         num_stages=args.pipeline_parallel_size, partition_method=part,
                         activation_checkpoint_interval=0)
    trainset = FakeImages(size=args.images)  # was: a CIFAR-10 download
    engine, _, _, _ = deepspeed.initialize(args=args, model=net,
                                           model_parameters=[p for p in net.parameters() if p.requires_grad],
                                           training_data=trainset)
    for _ in range(args.steps):
        engine.train_batch()  # rank 0 prints "steps: N loss: ..." every steps_per_print steps


if __name__ == "__main__":
    args = get_args()
    deepspeed.init_distributed(dist_backend=args.backend)
    args.local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():  # was unconditional: this runs on CPUs too
        torch.cuda.set_device(args.local_rank)
    train_pipe(args)
