"""Search candidates (grid, schedule, micro-batch size, ZeRO) for a model on a cluster.

Every candidate is first screened with closed-form pipeline formulas (cheap), then the
shortlist that fits in memory is timed by the schedule simulator and ranked by step time.
When nothing in the space fits, the search widens to ZeRO-2/3 and optimizer offload (which
trade traffic or host time for memory) and each proposal says why (``Prediction.notes``).
A ZeRO-2/3 candidate that does not fit with its once-per-step full-size gradient buffer is
tried again with bucket-by-bucket reduction (``zero.reduce_every_micro_batch``), never otherwise:
the planner never predicts it faster, and among a tie its smaller memory would win on memory alone.
At tensor > 1 every layout is also screened with sequence parallelism (its twin, ``Candidate.sequence_parallel``;
``model.sequence_parallel=true`` in the config: only with it): both go to the simulator, and where they tie
(GPUs: the same ring bytes, the re-gathers overlapped) the choice's memory tie-break takes SP. Where the
device does not overlap communication (CPU gloo) the twin is tried only when the layout does not fit
without it: measured 1.22-1.27x slower per step there (docs/hf_tensor_parallel.md), and the link model
prices a gloo collective far below what it measured, so a predicted tie would not be one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from pipegrid.plan.choice import TIE_WITHIN, with_choice_notes
from pipegrid.plan.hardware import ClusterSpec
from pipegrid.plan.memory import OptimizerSpec, activation_bytes, in_step_bytes, memory_report
from pipegrid.plan.model import LayerCost, TransformerConfig, transformer_layers
from pipegrid.plan.predict import (
    DEFAULT_BUCKET_ELEMENTS, Candidate, Prediction, _chunk_costs, host_bytes, micro_batches_of, offload_step_s,
    placement_of, predict_transformer, split_chunks,
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
    offload: tuple[bool, ...] = (False,)
    """Optimizer offload tried (True needs a ZeRO stage >= 1; at data=1 it is ZeRO-1 + offload)."""
    bucket_elements: int | None = DEFAULT_BUCKET_ELEMENTS
    """Bucket size tried for a ZeRO-2/3 candidate (data > 1) that does not fit once per step
    (``zero.reduce_every_micro_batch``; None: never)."""
    widen: bool = True
    """When no candidate fits: search again with ZeRO stages 0-3 and offload, saying why."""
    tie_within: float = TIE_WITHIN
    """Predictions this close (a fraction of the fastest) are a tie, inside the cost model's error:
    the pick among them has the fewest messages, then the least memory, and says so (``choice``)."""


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
                    out.extend(Candidate(p, d, t, name, v, b, z, offload=o)
                               for z in space.zero for o in space.offload if _runs(int(z), o, d))
    return out


def _runs(zero: int, offload: bool, data: int) -> bool:
    """The ZeRO settings the engine takes and that do something: offload needs a stage >= 1; at
    data=1 sharding saves nothing (ZeRO-1 only to offload) and ZeRO-3 is refused."""
    if data == 1:
        return zero == 0 and not offload or zero == 1 and offload
    return zero > 0 or not offload


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
def _layers(cfg: TransformerConfig, b: int, t: int, sequence_parallel: bool) -> tuple[LayerCost, ...]:
    return tuple(transformer_layers(cfg, b, t, sequence_parallel))


def _with_sequence_parallel(cfg: TransformerConfig, candidate: Candidate) -> list[Candidate]:
    """The candidate and its sequence-parallel twin at tensor > 1; only the twin where the config
    forces sequence parallelism (``model.sequence_parallel=true``)."""
    if candidate.tensor == 1:
        return [candidate]
    twin = replace(candidate, sequence_parallel=True)
    return [twin] if cfg.sequence_parallel else [candidate, twin]


def _shortlist(screened: list[tuple[float, Candidate]], layouts: int) -> list[Candidate]:
    """The screened candidates of the ``layouts`` fastest layouts, both twins of each (SP or not)
    kept, so sequence parallelism never pushes a layout off the list."""
    keep: dict[Candidate, None] = {}
    for _, candidate in screened:
        keep.setdefault(replace(candidate, sequence_parallel=False))
        if len(keep) == layouts:
            break
    return [candidate for _, candidate in screened if replace(candidate, sequence_parallel=False) in keep]


def _screen(cfg: TransformerConfig, candidate: Candidate, cluster: ClusterSpec,
            optimizer: OptimizerSpec) -> tuple[float, int, bool]:
    """(closed-form step seconds, peak device bytes, fits) without the simulator: textbook bubbles."""
    p, v, m = candidate.pipe, candidate.virtual_stages, micro_batches_of(cfg.global_batch, candidate)
    chunks = split_chunks(_layers(cfg, candidate.micro_batch_size, candidate.tensor, candidate.sequence_parallel),
                          p * v)
    intra, inter = cluster.links()
    tp = intra if candidate.tensor <= cluster.devices_per_host else inter
    c = _chunk_costs(chunks, cluster.device, candidate.tensor, tp, cfg.recompute, True)
    hints = registry.get(candidate.schedule).hints
    assert hints is not None, "candidates() proposes only schedules with planner hints"
    pipeline = hints.pipeline(p, m, v, c["F"], c["B"], c["W"])
    first = [chunks[s] for s in placement_of(candidate).stages_of(0)]  # rank 0: the most held in 1F1B
    params = sum(l.parameters for chunk in first for l in chunk)
    report = memory_report(params, optimizer, data=candidate.data, zero=candidate.zero, offload=candidate.offload,
                           bucket_elements=candidate.bucket_elements)
    peak = report["total"] + in_step_bytes(report) + activation_bytes(first, [hints.held(p, m, v)] * v, cfg.recompute)
    host_ok = host_bytes(report) * cluster.devices_per_host <= cluster.device.host_memory_bytes
    if candidate.offload:
        shard = params / (candidate.data if candidate.zero else 1)
        pipeline += offload_step_s(shard, cluster.device, min(cluster.devices_per_host, candidate.devices))
    return pipeline, peak, peak <= cluster.device.memory_bytes and host_ok


def search(cfg: TransformerConfig, cluster: ClusterSpec, space: SearchSpace = SearchSpace(),
           top: int = 10) -> list[Prediction]:
    """The ``top`` fitting candidates, fastest predicted step first, but the pick first: on a tie
    (predictions within ``space.tie_within``) the one with the fewest messages, then the least
    memory, with the reason in its notes and the tied ones'."""
    optimizer = OptimizerSpec(space.optimizer, cfg.dtype)
    screened, smallest = [], (float("inf"), None)
    for layout in candidates(cfg, cluster, space):
        for candidate in _with_sequence_parallel(cfg, layout):
            seconds, peak, fits = _screen(cfg, candidate, cluster, optimizer)
            smallest = min(smallest, (peak, candidate), key=lambda item: item[0])
            if not fits and space.bucket_elements and int(candidate.zero) >= 2 and candidate.data > 1:
                candidate = replace(candidate, bucket_elements=space.bucket_elements)  # its bucketed twin
                seconds, _, fits = _screen(cfg, candidate, cluster, optimizer)
            if fits:
                screened.append((seconds, candidate))
            if fits and not cluster.device.overlaps_comm:
                break  # CPU gloo: sequence parallelism only where the layout does not fit without it
    screened.sort(key=lambda item: (item[0], item[1].zero, item[1].offload, item[1].label()))
    predictions = [predict_transformer(cfg, candidate, cluster, space.optimizer)
                   for candidate in _shortlist(screened, max(space.shortlist, top))]
    fitting = [_with_bucket_note(pr, cfg, cluster, space.optimizer) if pr.candidate.bucket_elements else pr
               for pr in predictions if pr.fits]
    if not cfg.sequence_parallel:
        fitting = _with_sequence_parallel_notes(fitting, predictions, cfg, cluster, space.optimizer, top)
    wider = replace(space, zero=(0, 1, 2, 3), offload=(False, True), widen=False)
    if not fitting and space.widen and wider != replace(space, widen=False):
        return [_with_reason(pr, smallest, cluster) for pr in search(cfg, cluster, wider, top)]
    if not fitting:
        raise ValueError(f"no candidate of {cfg.name} fits in {cluster.device.memory_bytes / 2**30:.0f} GiB "
                         f"per device on {cluster.name}, even with ZeRO-3 or optimizer offload; add devices, "
                         "use smaller micro-batches or turn recomputation on (model.recompute=true)")
    return with_choice_notes(sorted(fitting, key=lambda pr: pr.step_s), space.tie_within)[:top]


def _with_reason(prediction: Prediction, smallest: tuple[float, Candidate | None], cluster: ClusterSpec) -> Prediction:
    """``prediction`` (found by the widened search) with a note saying why it needs what it uses."""
    gib = 2 ** 30
    candidate = prediction.candidate
    uses = [f"ZeRO-{int(candidate.zero)}"] if int(candidate.zero) >= 2 else []
    uses += ["bucket-by-bucket gradient reduction"] if candidate.bucket_elements else []
    uses += ["optimizer offload"] if candidate.offload else []
    without = "" if smallest[1] is None else \
        f"; the smallest layout without needs {smallest[0] / gib:.0f} GiB ({smallest[1].label()})"
    host = f", {prediction.host_bytes / gib:.0f} GiB on the host" if candidate.offload else ""
    note = (f"{' and '.join(uses) or 'this ZeRO stage'}: no layout fits {cluster.device.memory_bytes / gib:.0f} GiB "
            f"per device otherwise{without}; this one needs {prediction.peak_memory_bytes / gib:.0f} GiB{host}")
    return replace(prediction, notes=(*prediction.notes, note))


def _with_bucket_note(prediction: Prediction, cfg: TransformerConfig, cluster: ClusterSpec,
                     optimizer: str) -> Prediction:
    """``prediction`` (bucketed ZeRO-2/3) with a note: what the buckets save against the full-size
    buffer once per step, and what the m reductions per step cost."""
    gib, candidate = 2 ** 30, prediction.candidate
    once = predict_transformer(cfg, replace(candidate, bucket_elements=None), cluster, optimizer)
    saved = once.peak_memory_bytes - prediction.peak_memory_bytes
    hidden = "posted from the backward, which they overlap on this device" if cluster.device.overlaps_comm \
        else "not overlapped: the device's transfers share the backward's cores"
    note = (f"{candidate.label()}: reducing the gradients bucket by bucket (zero.reduce_every_micro_batch) "
            f"holds the gradient shard and ~3 buckets of {candidate.bucket_elements} elements instead of the "
            f"full-size fp32 buffer, {saved / gib:.1f} GiB less ({prediction.peak_memory_bytes / gib:.1f} against "
            f"{once.peak_memory_bytes / gib:.1f} GiB, which does not fit {cluster.device.memory_bytes / gib:.0f} GiB); "
            f"the price is {prediction.micro_batches} reductions a step instead of one: data-parallel sync "
            f"{prediction.data_sync_s:.2f}s against {once.data_sync_s:.2f}s ({hidden}), step "
            f"{prediction.step_s:.2f}s against {once.step_s:.2f}s")
    return replace(prediction, notes=(*prediction.notes, note))


def _with_sequence_parallel_notes(fitting: list[Prediction], predictions: list[Prediction], cfg: TransformerConfig,
                                  cluster: ClusterSpec, optimizer: str, top: int) -> list[Prediction]:
    """``fitting`` with a note on each of the ``top`` fastest sequence-parallel ones: what SP saves
    against its twin without and what it costs (``predictions``: the twins already timed)."""
    timed = {pr.candidate: pr for pr in predictions}
    fastest = sorted(fitting, key=lambda pr: pr.step_s)[:top]
    noted = {id(pr) for pr in fastest if pr.candidate.sequence_parallel}
    return [_with_sp_note(pr, timed, cfg, cluster, optimizer) if id(pr) in noted else pr for pr in fitting]


def _with_sp_note(prediction: Prediction, timed: dict[Candidate, Prediction], cfg: TransformerConfig,
                  cluster: ClusterSpec, optimizer: str) -> Prediction:
    gib, candidate = 2 ** 30, prediction.candidate
    plain = replace(candidate, sequence_parallel=False)
    without = timed.get(plain) or predict_transformer(cfg, plain, cluster, optimizer)
    fits = "" if without.fits else f", which does not fit {cluster.device.memory_bytes / gib:.0f} GiB"
    overlap = "overlapped with the input-gradient GEMMs on this device" if cluster.device.overlaps_comm \
        else "not overlapped: the device's transfers share the backward's cores"
    gloo = "; a reduce-scatter costs an all-reduce here" if cluster.device.reduce_scatter_allreduces else ""
    note = (f"{candidate.label()}: sequence parallelism (model.sequence_parallel=true; a pipegrid.hf model: "
            f"from_pretrained(..., sequence_parallel=True)) keeps {prediction.memory['activations'] / gib:.1f} GiB "
            f"of activations against {without.memory['activations'] / gib:.1f} GiB without (peak "
            f"{prediction.peak_memory_bytes / gib:.1f} against {without.peak_memory_bytes / gib:.1f} GiB{fits}) "
            f"and sends 1/{candidate.tensor} of each stage message; each tensor-parallel all-reduce becomes a "
            f"reduce-scatter + all-gather of the same ring bytes, and backward re-gathers each column layer's "
            f"input ({overlap}{gloo}): step {prediction.step_s:.2f}s against {without.step_s:.2f}s")
    return replace(prediction, notes=(*prediction.notes, note))


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
