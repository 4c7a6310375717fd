"""Model and cluster presets as plain dataclasses (the Hydra YAMLs hold the same numbers)."""

from __future__ import annotations

from typing import Any

from pipegrid.plan.hardware import ClusterSpec, DeviceSpec
from pipegrid.plan.model import TransformerConfig

__all__ = ["model_from_dict", "cluster_from_dict"]


def model_from_dict(cfg: dict[str, Any]) -> TransformerConfig:
    """A TransformerConfig from a model YAML's keys (``published`` is read by the CLI)."""
    return TransformerConfig(**{k: v for k, v in cfg.items() if k != "published"})


def cluster_from_dict(cfg: dict[str, Any]) -> ClusterSpec:
    """A ClusterSpec from a cluster YAML: device in TFLOP/s, GiB, GB/s."""
    cfg = dict(cfg)
    device = dict(cfg.pop("device"))
    spec = DeviceSpec(peak_flops=device.pop("peak_tflops") * 1e12,
                      memory_bytes=device.pop("memory_gib") * 2 ** 30,
                      memory_bandwidth=device.pop("memory_gbytes_per_s") * 1e9, **device)
    return ClusterSpec(device=spec, **cfg)
