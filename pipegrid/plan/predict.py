"""Predict one candidate: per-stage op costs from the cost model, timed by the schedule simulator.

step = pipeline makespan (simulated; p2p latency on every send -> recv) + data-parallel
gradient sync (ring all-reduce, or ZeRO-1 reduce-scatter + all-gather; bucketed ZeRO-2/3: one
reduction per micro-batch, ``data_sync_s``) + optimizer step
(with ZeRO-Offload: the CPU step at the host's memory bandwidth and the gradient shard's
copy down and the master shard's copy up at the host link's, ``offload_step_s``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pipegrid.plan.collectives import ring_allgather_s, ring_allreduce_s, sequence_regather_s, tensor_comm_s
from pipegrid.plan.hardware import ClusterSpec, DeviceSpec, Link
from pipegrid.plan.memory import OptimizerSpec, activation_bytes, in_step_bytes, memory_report
from pipegrid.plan.model import (
    DTYPE_BYTES, ChunkCost, LayerCost, TransformerConfig, megatron_flops_per_step, transformer_layers,
)
from pipegrid.plan.simulation import simulate_step
from pipegrid.schedules import Placement, registry
from pipegrid.topology.grid import Topology

__all__ = ["Candidate", "Prediction", "predict", "predict_transformer", "ring_allreduce_s",
           "split_chunks", "micro_batches_of", "placement_of", "offload_step_s", "host_bytes", "messages_per_step",
           "DEFAULT_BUCKET_ELEMENTS", "data_sync_s"]

_OPTIMIZER_BYTES_PER_PARAM = 28  # Adam: read+write master, m, v (24) + read grad, write param
DEFAULT_BUCKET_ELEMENTS = 1 << 24
"""``zero.bucket_elements``'s default (``conf.schema.ZeroConfig``; a test holds them equal)."""


@dataclass(frozen=True)
class Candidate:
    """One way to run the model that the planner weighs: the grid, the schedule and how the batch is cut."""

    pipe: int
    data: int = 1
    tensor: int = 1
    schedule: str = "1f1b"
    """A ``pipegrid.schedules`` name."""
    virtual_stages: int = 1
    """Model chunks per pipe rank (interleaved_1f1b: any; zb_v, dualpipev: 2)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    zero: bool | int = False
    """ZeRO stage (True: 1): 1 shards optimizer state and master weights over the data axis, 2 the
    gradients too, 3 the parameters too; all three move the same bytes per step (docs/zero.md)."""
    coalesce: int = 1
    """Micro-batches per point-to-point message (``schedule.coalesce``)."""
    offload: bool = False
    """ZeRO-Offload (``zero.offload_optimizer=cpu``, needs ``zero`` >= 1): master weights and
    optimizer state of the shard in host memory, the optimizer step on the CPU."""
    bucket_elements: int | None = None
    """ZeRO-2/3 only: reduce the gradients bucket by bucket during every micro-batch's backward
    (``zero.reduce_every_micro_batch``, buckets of this many elements) instead of once per step
    from a full-size fp32 buffer: less memory, m times the gradient traffic. None: once per step."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (tensor > 1 only; ``model.sequence_parallel=true``, for a
    ``pipegrid.hf`` model ``from_pretrained(..., sequence_parallel=True)``): norms, dropout, residuals,
    their activations and the stage messages hold 1/t of the tokens; backward re-gathers each
    column-parallel group's input (``LayerCost.sequence_regathers``)."""

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tensor <= 1:
            raise ValueError(f"sequence_parallel=True splits the sequence over the tensor axis, but tensor="
                             f"{self.tensor}; set tensor >= 2 or sequence_parallel=False")
        if self.bucket_elements is not None and (int(self.zero) < 2 or self.bucket_elements < 1):
            raise ValueError(f"bucket_elements={self.bucket_elements} needs zero=2 or 3 and a positive size "
                             f"(got zero={self.zero}); set zero=2 or bucket_elements=None")

    @property
    def devices(self) -> int:
        return self.pipe * self.data * self.tensor

    def overrides(self, micro_batches: int | None = None) -> list[str]:
        """The training config's Hydra overrides that run this layout (``micro_batches``: per
        pipeline per step; the micro-batch size is the data loader's, not a config key)."""
        out = [f"topology.pipe={self.pipe}", f"topology.data={self.data}", f"topology.tensor={self.tensor}",
               f"schedule.name={self.schedule}"]
        out += [f"schedule.micro_batches={micro_batches}"] if micro_batches is not None else []
        out += [f"schedule.virtual_stages={self.virtual_stages}"] if self.virtual_stages > 1 else []
        out += [f"schedule.coalesce={self.coalesce}"] if self.coalesce > 1 else []
        out += [f"zero.stage={int(self.zero)}"] if self.zero else []
        out += ["zero.offload_optimizer=cpu"] if self.offload else []
        out += ["model.sequence_parallel=true"] if self.sequence_parallel else []
        if self.bucket_elements is not None:
            out.append("zero.reduce_every_micro_batch=true")
            if self.bucket_elements != DEFAULT_BUCKET_ELEMENTS:
                out.append(f"zero.bucket_elements={self.bucket_elements}")
        return out

    def label(self) -> str:
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        c = f" c={self.coalesce}" if self.coalesce > 1 else ""
        return (f"p={self.pipe} d={self.data} t={self.tensor} {self.schedule}{v}{c} "
                f"b={self.micro_batch_size}{f' zero{int(self.zero)}' if self.zero else ''}"
                f"{' offload' if self.offload else ''}{self._bucket_label()}{' sp' if self.sequence_parallel else ''}")

    def _bucket_label(self) -> str:
        if self.bucket_elements is None:
            return ""
        return " bucketed" if self.bucket_elements == DEFAULT_BUCKET_ELEMENTS else f" bucketed={self.bucket_elements}"


@dataclass(frozen=True)
class Prediction:
    """What a candidate is predicted to do per optimizer step (busiest rank for memory)."""

    candidate: Candidate
    micro_batches: int
    step_s: float
    pipeline_s: float
    """Simulated makespan of the schedule."""
    data_sync_s: float
    optimizer_s: float
    bubble_fraction: float
    costs: dict[str, float]
    """Per-chunk F, B, W and p2p comm seconds given to the simulator (bottleneck chunk)."""
    memory: dict[str, int]
    """``engine.memory_report()`` keys plus ``activations`` (not in ``total``)."""
    peak_memory_bytes: int
    """total + activations."""
    device_memory_bytes: float
    hardware_flops: float | None = None
    """FLOPs per step including recomputation (Narayanan et al. eq. 3)."""
    model_flops: float | None = None
    """FLOPs per step without recomputation."""
    peak_flops: float = math.nan
    notes: tuple[str, ...] = field(default=())
    host_bytes: int = 0
    """Host memory one device's offloaded state takes (``*_host`` keys of ``memory``)."""
    host_memory_bytes: float = math.inf
    """Host memory per device (the host's, shared by its devices)."""
    stage_costs: tuple[dict[str, float], ...] | None = None
    """F, B, W per model stage when measured chunk costs were given (else None: every
    stage costs ``costs``)."""
    messages: int = 0
    """Point-to-point messages per step, all pipe ranks of one pipeline together
    (``messages_per_step``): each pays a post, and on CPU gloo may wait for a wake-up."""

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.device_memory_bytes and self.host_bytes <= self.host_memory_bytes

    def _utilisation(self, flops: float | None) -> float | None:
        if flops is None:
            return None
        return flops / (self.step_s * self.candidate.devices * self.peak_flops)

    @property
    def hfu(self) -> float | None:
        """Hardware FLOPs utilisation: what the paper's Table 1 reports as % of peak."""
        return self._utilisation(self.hardware_flops)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation (recomputation not counted)."""
        return self._utilisation(self.model_flops)

    @property
    def tflops_per_device(self) -> float | None:
        if self.hardware_flops is None:
            return None
        return self.hardware_flops / self.step_s / self.candidate.devices / 1e12


def placement_of(candidate: Candidate) -> Placement:
    """Which pipe rank holds each of the candidate's model chunks (the schedule's placement)."""
    spec = registry.get(candidate.schedule)
    return Placement(spec.placement_for(candidate.virtual_stages), candidate.pipe, candidate.virtual_stages)


def messages_per_step(candidate: Candidate, micro_batches: int) -> int:
    """Point-to-point messages one pipeline sends per training step: an activation and a gradient
    per group of ``coalesce`` micro-batches across every model-stage boundary between two ranks
    (a V's turn-around stays on its rank)."""
    placement = placement_of(candidate)
    crossings = sum(not placement.same_rank(s, s + 1) for s in range(placement.num_stages - 1))
    return 2 * crossings * (micro_batches // candidate.coalesce)


def data_sync_s(parameters: int, width: int, candidate: Candidate, micro_batches: int, link: Link,
                backward_s: float, overlaps_comm: bool, post_s: float = 0.0) -> float:
    """Seconds the data-parallel gradient sync adds to a step, for a rank of ``parameters``
    communicated at ``width`` bytes each (S = parameters x width).

    Once per step: a ring all-reduce of S (ZeRO-1/2/3: reduce-scatter + all-gather, the same bytes).
    Bucket by bucket (``candidate.bucket_elements``): each of the m micro-batches reduces S, each
    bucket to the data rank owning it. Assumed: a reduce of S bytes on a ring costs S / bandwidth,
    n/(n-1) times a reduce-scatter of the same S, plus (n-1) latencies per bucket (a pipelined
    chain: every link carries the bytes once; nccl-tests' doc/PERFORMANCE.md gives Reduce's bus
    bandwidth factor as 1, ReduceScatter's as (n-1)/n), and ``post_s`` of host time per bucket
    (a collective posted from a backward hook; ``DeviceSpec.post_s``, 0 on GPUs). Where the
    device overlaps communication with compute (``DeviceSpec.overlaps_comm``), a micro-batch's
    reductions run under its backward (``backward_s``) and only what exceeds it is charged, plus
    the last bucket's, which follows the last backward; otherwise (CPU gloo) all m are charged.
    The updated parameters' all-gather then costs what it does once per step. Never less than
    the once-per-step sync: the overlapped bytes still occupy the data-parallel link, and the
    once-per-step reduce-scatter's own overlap with other pipe ranks' cooldown is not credited
    either, so bucketing is never predicted faster.
    """
    d, total = candidate.data, parameters * width
    once = ring_allreduce_s(total, d, link)
    if candidate.bucket_elements is None or d <= 1:
        return once
    shard = -(-parameters // d)
    buckets = d * -(-shard // candidate.bucket_elements)  # each bucket lies within one shard
    reduce_s = total / link.bandwidth + buckets * ((d - 1) * link.latency + post_s)
    last_bucket_s = min(candidate.bucket_elements, shard) * width / link.bandwidth + (d - 1) * link.latency
    exposed = micro_batches * (max(0.0, reduce_s - backward_s) if overlaps_comm else reduce_s)
    return max(once, ring_allgather_s(total, d, link) + exposed + (last_bucket_s if overlaps_comm else 0.0))


def micro_batches_of(global_batch: int, candidate: Candidate) -> int:
    """Micro-batches per pipeline: global batch / (data x micro-batch size), exactly."""
    per_replica, rest = divmod(global_batch, candidate.data * candidate.micro_batch_size)
    if rest or per_replica < 1:
        raise ValueError(f"global batch {global_batch} does not split into data={candidate.data} x "
                         f"micro_batch_size={candidate.micro_batch_size}; pick sizes that divide it")
    return per_replica


def offload_step_s(shard_parameters: float, device: DeviceSpec, devices_per_host: int) -> float:
    """Seconds of ZeRO-Offload's optimizer step for one device's shard: Adam on the host streams
    28 bytes per parameter at the host memory bandwidth its ``devices_per_host`` devices share,
    and the fp32 gradient shard goes down and the fp32 master shard comes back up over the host
    link (4 + 4 bytes per parameter; on CUDA the gradient copy overlaps the backward, which this
    does not count: an upper bound)."""
    cpu_step = shard_parameters * _OPTIMIZER_BYTES_PER_PARAM / (device.host_memory_bandwidth / devices_per_host)
    copies = shard_parameters * (4 + 4) / device.host_link_bandwidth
    return cpu_step + copies


def host_bytes(report: dict[str, int]) -> int:
    """Host bytes of a memory report (its ``*_host`` keys)."""
    return sum(v for k, v in report.items() if k.endswith("_host"))


def split_chunks(layers: Sequence[LayerCost], chunks: int) -> list[list[LayerCost]]:
    """Megatron's cut: the middle layers evenly over ``chunks`` (earlier chunks get the
    remainder), a leading ``embedding`` joins the first chunk, a trailing ``logits`` the last."""
    head = 1 if layers and layers[0].name == "embedding" else 0
    tail = 1 if len(layers) > head and layers[-1].name == "logits" else 0
    body = list(layers[head:len(layers) - tail])
    if len(body) < chunks:
        raise ValueError(f"{len(body)} layers cannot fill {chunks} pipeline chunks (pipe x "
                         "virtual_stages); use fewer stages or virtual stages")
    size, extra = divmod(len(body), chunks)
    out, start = [], 0
    for c in range(chunks):
        end = start + size + (1 if c < extra else 0)
        out.append(body[start:end])
        start = end
    out[0] = list(layers[:head]) + out[0]
    out[-1] = out[-1] + list(layers[len(layers) - tail:])
    return out


def _layer_times(layer: LayerCost, device: DeviceSpec, tensor: int, tp_link: Link,
                 recompute: bool) -> tuple[float, float, float]:
    """(forward, backward-input, backward-weight) seconds of one layer on one rank."""
    tp = tensor_comm_s(layer, tensor, tp_link, device)  # forward, and the same again in backward
    if layer.forward_s is not None:
        forward = layer.forward_s * device.slowdown
        backward = (layer.backward_s or 0.0) * device.slowdown
        regather = sequence_regather_s(layer, tensor, tp_link, device, backward / 2)
        return forward + tp, backward / 2 + tp + regather, backward / 2
    rate = device.peak_flops * device.gemm_efficiency
    forward = layer.forward_flops / rate + layer.forward_memory_bytes / device.memory_bandwidth + tp
    gemm_half = layer.backward_flops / rate / 2  # dX and dW GEMMs are the same size
    backward_input = (gemm_half + 2 * layer.forward_memory_bytes / device.memory_bandwidth + tp
                      + sequence_regather_s(layer, tensor, tp_link, device, gemm_half))
    if recompute and layer.checkpoint_bytes > 0:
        backward_input += forward
    return forward, backward_input, gemm_half


def _chunk_costs(chunks: list[list[LayerCost]], device: DeviceSpec, tensor: int, tp_link: Link,
                 recompute: bool, split: bool) -> dict[str, float]:
    """F, B, W of the slowest chunk: the simulator takes one cost per op kind, and the
    bottleneck stage sets the pace of a pipeline's steady state."""
    best = (-1.0, 0.0, 0.0, 0.0)
    for layers in chunks:
        f = b = w = 0.0
        for layer in layers:
            lf, lb, lw = _layer_times(layer, device, tensor, tp_link, recompute)
            f, b, w = f + lf, b + lb, w + lw
        if f + b + w > best[0]:
            best = (f + b + w, f, b, w)
    _, f, b, w = best
    return {"F": f, "B": b, "W": w} if split else {"F": f, "B": b + w, "W": 0.0}


def _measured_stage_costs(chunk_costs: Sequence[ChunkCost] | None, chunks: int, split: bool,
                          device: DeviceSpec, candidate: Candidate) -> tuple[dict[str, float], ...] | None:
    if chunk_costs is None:
        return None
    if len(chunk_costs) != chunks:
        raise ValueError(f"{candidate.label()} runs {chunks} chunks (pipe x virtual_stages), got "
                         f"{len(chunk_costs)} measured chunk costs; profile the layers cut into {chunks} chunks")
    return tuple(c.stage_costs(split, device.slowdown) for c in chunk_costs)


def predict(layers: Sequence[LayerCost], candidate: Candidate, cluster: ClusterSpec, *, micro_batches: int,
            optimizer: OptimizerSpec = OptimizerSpec(), recompute: bool = False,  # noqa: B008 (frozen)
            hardware_flops: float | None = None, model_flops: float | None = None,
            scatter_gather: bool = True, chunk_costs: Sequence[ChunkCost] | None = None) -> Prediction:
    """Predict ``candidate`` for ``layers`` (costs of one micro-batch on one tensor rank).

    ``scatter_gather``: Megatron's p2p optimisation (each tensor rank sends 1/t of the
    activation over its own link); p2p then moves ``output_bytes / tensor`` per hop, except under
    ``candidate.sequence_parallel``, whose ``layers`` already send 1/t (their ``output_bytes``).
    ``chunk_costs``: measured costs of the candidate's p x v chunks in model-stage order
    (``pipegrid.plan.profile.profile_chunks``); they replace the layer sums, stage by stage.
    """
    p, v, t, d = candidate.pipe, candidate.virtual_stages, candidate.tensor, candidate.data
    if candidate.devices > cluster.num_devices:
        raise ValueError(f"{candidate.label()} needs {candidate.devices} devices; {cluster.name} has "
                         f"{cluster.num_devices}")
    topo = Topology(pipe=p, data=d, tensor=t)
    hosts = cluster.host_of_ranks(topo)
    tp_link = cluster.slowest_link(hosts, topo.axis_groups("tensor"), ring=True)
    dp_link = cluster.slowest_link(hosts, topo.axis_groups("data"), ring=True)
    pp_link = cluster.slowest_link(hosts, topo.axis_groups("pipe"), ring=False)
    chunks = split_chunks(layers, p * v)
    placement = placement_of(candidate)
    split = registry.get(candidate.schedule).split_backward
    costs = _chunk_costs(chunks, cluster.device, t, tp_link, recompute, split)
    stage_costs = _measured_stage_costs(chunk_costs, len(chunks), split, cluster.device, candidate)
    if stage_costs is not None:
        costs = dict(max(stage_costs, key=lambda c: c["F"] + c["B"] + c["W"]))
    boundary = max(chunk[-1].output_bytes for chunk in chunks[:-1]) if p > 1 else 0.0
    # sequence parallelism: the layers' output is already 1/t (Megatron then skips scatter-gather)
    split_send = scatter_gather and not candidate.sequence_parallel
    message = candidate.coalesce * (boundary / t if split_send else boundary)  # a group per message
    costs["comm"] = pp_link.time(message) if p > 1 else 0.0
    costs["post"] = cluster.device.post_s if p > 1 else 0.0
    costs["wake"] = cluster.device.wake_s if p > 1 else 0.0
    sim = simulate_step(candidate.schedule, p, micro_batches, v, costs, coalesce=candidate.coalesce,
                        stage_costs=stage_costs)
    per_rank = [[chunks[s] for s in placement.stages_of(r)] for r in range(p)]
    params = [sum(l.parameters for c in cs for l in c) for cs in per_rank]
    backward_s = v * (costs["B"] + costs["W"])  # one micro-batch's backward on a rank: v bottleneck chunks
    data_sync = data_sync_s(max(params), DTYPE_BYTES[optimizer.dtype], candidate, micro_batches, dp_link,
                            backward_s, cluster.device.overlaps_comm, cluster.device.post_s)
    shard = max(params) / (d if candidate.zero else 1)
    optimizer_s = shard * _OPTIMIZER_BYTES_PER_PARAM / cluster.device.memory_bandwidth
    if candidate.offload:
        optimizer_s = offload_step_s(shard, cluster.device, min(cluster.devices_per_host, candidate.devices))
    memory, peak = _busiest_memory(per_rank, params, sim.peak_inflight, candidate, optimizer, recompute, placement)
    notes = [] if sim.extrapolated_from is None else \
        ["simulated at m={},{} and extended linearly".format(*sim.extrapolated_from)]
    return Prediction(candidate=candidate, micro_batches=micro_batches,
                      step_s=sim.makespan + data_sync + optimizer_s, pipeline_s=sim.makespan,
                      data_sync_s=data_sync, optimizer_s=optimizer_s, bubble_fraction=sim.bubble_fraction,
                      costs=costs, stage_costs=stage_costs, memory=memory, peak_memory_bytes=peak,
                      device_memory_bytes=cluster.device.memory_bytes, hardware_flops=hardware_flops,
                      model_flops=model_flops, peak_flops=cluster.device.peak_flops, notes=tuple(notes),
                      host_bytes=host_bytes(memory), messages=messages_per_step(candidate, micro_batches),
                      host_memory_bytes=cluster.device.host_memory_bytes / cluster.devices_per_host)


def _busiest_memory(per_rank: list[list[list[LayerCost]]], params: list[int], inflight: Sequence[int],
                    candidate: Candidate, optimizer: OptimizerSpec, recompute: bool,
                    placement: Placement) -> tuple[dict[str, int], int]:
    best: tuple[int, dict[str, int]] = (-1, {})
    for rank, chunks in enumerate(per_rank):
        counts = [inflight[s] for s in placement.stages_of(rank)]  # each chunk's own peak: an upper bound
        report = memory_report(params[rank], optimizer, data=candidate.data, zero=candidate.zero,
                               offload=candidate.offload, bucket_elements=candidate.bucket_elements)
        report["activations"] = activation_bytes(chunks, counts, recompute)
        peak = report["total"] + in_step_bytes(report) + report["activations"]
        if peak > best[0]:
            best = (peak, report)
    return best[1], best[0]


def predict_transformer(cfg: TransformerConfig, candidate: Candidate, cluster: ClusterSpec,
                        optimizer: str = "adam") -> Prediction:
    """Predict ``candidate`` for a GPT-style model, FLOPs from Narayanan et al. eq. 3. A config that
    forces sequence parallelism (``cfg.sequence_parallel``) turns it on in every candidate at tensor > 1."""
    if cfg.sequence_parallel and candidate.tensor > 1 and not candidate.sequence_parallel:
        candidate = replace(candidate, sequence_parallel=True)
    m = micro_batches_of(cfg.global_batch, candidate)
    layers = transformer_layers(cfg, candidate.micro_batch_size, candidate.tensor, candidate.sequence_parallel)
    return predict(layers, candidate, cluster, micro_batches=m,
                   optimizer=OptimizerSpec(optimizer, cfg.dtype), recompute=cfg.recompute,
                   hardware_flops=megatron_flops_per_step(cfg),
                   model_flops=megatron_flops_per_step(cfg, recompute=False))
