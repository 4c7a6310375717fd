"""Search candidates (grid, schedule, micro-batch size, ZeRO) for a model on a cluster.

Every candidate is first screened with closed-form pipeline formulas (cheap), then the
shortlist that fits in memory is timed by the schedule simulator and ranked by step time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pipegrid.plan.hardware import ClusterSpec
from pipegrid.plan.memory import OptimizerSpec, activation_bytes, in_step_bytes, memory_report
from pipegrid.plan.model import LayerCost, TransformerConfig, transformer_layers
from pipegrid.plan.predict import (
    Candidate, Prediction, _chunk_costs, micro_batches_of, placement_of, predict_transformer, split_chunks,
)
from pipegrid.schedules import ScheduleError, registry

__all__ = ["SearchSpace", "candidates", "search", "explain"]


@dataclass(frozen=True)
class SearchSpace:
    """What the search may choose."""

    schedules: tuple[str, ...] = tuple(name for name, spec in registry.SCHEDULES.items() if spec.hints)
    """Every schedule the registry gives planner hints for."""
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4)
    virtual_stages: tuple[int, ...] = (2, 4)
    """Chunks per rank tried for schedules that run any number (interleaved_1f1b)."""
    zero: tuple[bool | int, ...] = (False, True)
    """ZeRO stages tried (0-3; True is 1); at equal predicted time the lower stage is proposed."""
    shortlist: int = 8
    """How many screened candidates the simulator times."""
    optimizer: str = "adam"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(cfg: TransformerConfig, cluster: ClusterSpec, space: SearchSpace) -> list[Candidate]:
    """Every candidate using all devices: tensor <= GPUs per host (dividing the heads),
    pipe chunks <= layers, interleaving only when layers split evenly into p x v chunks."""
    out = []
    for t in [t for t in _divisors(cluster.devices_per_host) if cfg.splits_over(t)]:
        if cluster.num_devices % t:
            continue
        for p in [p for p in _divisors(cluster.num_devices // t) if p <= cfg.layers]:
            d = cluster.num_devices // (t * p)
            for b in space.micro_batch_sizes:
                if cfg.global_batch % (d * b):
                    continue
                m = cfg.global_batch // (d * b)
                for name, v in _schedules(space, cfg.layers, p, m):
                    out.extend(Candidate(p, d, t, name, v, b, z) for z in space.zero if d > 1 or not z)
    return out


def _schedules(space: SearchSpace, layers: int, p: int, m: int) -> list[tuple[str, int]]:
    """(schedule, chunks per rank) the registry accepts here; several chunks only when the
    layers split evenly into p x v of them."""
    if p == 1:  # every schedule is the same loop on one pipe rank
        return [("1f1b", 1)]
    out = []
    for name in space.schedules:
        spec = registry.get(name)
        for v in (spec.chunks or space.virtual_stages) if spec.hints else ():
            if (v == 1 or layers % (p * v) == 0) and _accepts(spec, p, m, v):
                out.append((name, v))
    return out


def _accepts(spec: registry.ScheduleSpec, p: int, m: int, v: int) -> bool:
    try:
        if spec.check is not None:
            spec.check(p, m, v, 1)
    except ScheduleError:
        return False
    return True


@lru_cache(maxsize=16)
def _layers(cfg: TransformerConfig, b: int, t: int) -> tuple[LayerCost, ...]:
    return tuple(transformer_layers(cfg, b, t))


def _screen(cfg: TransformerConfig, candidate: Candidate, cluster: ClusterSpec,
            optimizer: OptimizerSpec) -> tuple[float, bool]:
    """(closed-form step seconds, fits) without the simulator: textbook bubbles."""
    p, v, m = candidate.pipe, candidate.virtual_stages, micro_batches_of(cfg.global_batch, candidate)
    chunks = split_chunks(_layers(cfg, candidate.micro_batch_size, candidate.tensor), p * v)
    intra, inter = cluster.links()
    tp = intra if candidate.tensor <= cluster.devices_per_host else inter
    c = _chunk_costs(chunks, cluster.device, candidate.tensor, tp, cfg.recompute, True)
    hints = registry.get(candidate.schedule).hints
    assert hints is not None, "candidates() proposes only schedules with planner hints"
    pipeline = hints.pipeline(p, m, v, c["F"], c["B"], c["W"])
    first = [chunks[s] for s in placement_of(candidate).stages_of(0)]  # rank 0: the most held in 1F1B
    params = sum(l.parameters for chunk in first for l in chunk)
    report = memory_report(params, optimizer, data=candidate.data, zero=candidate.zero)
    static = report["total"] + in_step_bytes(report)
    held = activation_bytes(first, [hints.held(p, m, v)] * v, cfg.recompute)
    return pipeline, static + held <= cluster.device.memory_bytes


def search(cfg: TransformerConfig, cluster: ClusterSpec, space: SearchSpace = SearchSpace(),
           top: int = 10) -> list[Prediction]:
    """The ``top`` fitting candidates, fastest predicted step first."""
    optimizer = OptimizerSpec(space.optimizer, cfg.dtype)
    screened = []
    for candidate in candidates(cfg, cluster, space):
        seconds, fits = _screen(cfg, candidate, cluster, optimizer)
        if fits:
            screened.append((seconds, candidate))
    screened.sort(key=lambda item: (item[0], item[1].zero, item[1].label()))
    predictions = [predict_transformer(cfg, candidate, cluster, space.optimizer)
                   for _, candidate in screened[:max(space.shortlist, top)]]
    fitting = [pr for pr in predictions if pr.fits]
    if not fitting:
        raise ValueError(f"no candidate of {cfg.name} fits in {cluster.device.memory_bytes / 2**30:.0f} GiB "
                         f"per device on {cluster.name}; add devices or allow ZeRO / smaller micro-batches")
    return sorted(fitting, key=lambda pr: pr.step_s)[:top]


def explain(faster: Prediction, slower: Prediction) -> str:
    """Why ``faster`` is predicted to beat ``slower``: the step-time parts that differ most."""
    parts = {
        "pipeline bubble": (faster.bubble_fraction * faster.pipeline_s, slower.bubble_fraction * slower.pipeline_s),
        "compute": ((1 - faster.bubble_fraction) * faster.pipeline_s, (1 - slower.bubble_fraction) * slower.pipeline_s),
        "data-parallel sync": (faster.data_sync_s, slower.data_sync_s),
        "optimizer": (faster.optimizer_s, slower.optimizer_s),
    }
    gains = sorted(((b - a, name, a, b) for name, (a, b) in parts.items()), reverse=True)
    said = [f"{name} {a:.2f}s vs {b:.2f}s" for gain, name, a, b in gains[:2] if gain > 0]
    if gains[0][1] == "compute" and faster.hardware_flops == slower.hardware_flops:
        chunks = [pr.candidate.pipe * pr.candidate.virtual_stages for pr in (faster, slower)]
        said.append(f"same FLOPs per device, so the gap is stage imbalance: the last of {chunks[1]} "
                    f"chunks also runs the logits layer (vs 1 of {chunks[0]})")
    return f"{faster.candidate.label()} beats {slower.candidate.label()} by " \
           f"{slower.step_s - faster.step_s:.2f}s/step: " + ("; ".join(said) or "ties")
