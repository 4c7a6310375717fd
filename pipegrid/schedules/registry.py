"""The schedule registry: one record per schedule, which everything else asks.

``build`` takes the compute order, placement, chunks and constraints from here; the
config schema its names; the engine its placement; the planner its hints. Adding a
schedule is its own module (a ``compute_order(placement, micro_batches)``) plus one
entry in ``_SPECS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from pipegrid.schedules import dualpipev, gpipe, inference, interleaved, one_f_one_b, zb_v, zero_bubble
from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import ComputeInstruction
from pipegrid.schedules.placement import Placement

__all__ = ["PlannerHints", "ScheduleSpec", "SCHEDULES", "SCHEDULE_NAMES", "TRAINING_SCHEDULES", "get", "stage_placement"]

ComputeOrder = Callable[[Placement, int], "list[list[ComputeInstruction]]"]
Check = Callable[[int, int, int, int], None]
"""(num_ranks, micro_batches, virtual_stages, coalesce) -> None, or ScheduleError saying what to change."""


@dataclass(frozen=True)
class PlannerHints:
    """What the layout planner's closed-form screen (before any simulation) assumes."""

    pipeline: Callable[[int, int, int, float, float, float], float]
    """(p, m, v, F, B, W per chunk) -> seconds of one pipeline step, the textbook bubble."""
    held: Callable[[int, int, int], int]
    """(p, m, v) -> micro-batches whose activations each chunk of the busiest rank holds."""
    steady: int = 1
    """From ``steady * p`` micro-batches on, each more adds the same time (the planner
    simulates two such sizes and extends the line): 1 for one chunk per rank or a loop, 2
    for a V, whose warm-up alone takes 2p - 1 forwards."""


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything pipegrid knows about one schedule."""

    name: str
    """What ``build``, ``schedule.name`` and the planner call it."""
    compute_order: ComputeOrder
    """Per rank, its Forward/Backward(Input/Weight) order; lowering adds everything else."""
    summary: str
    """One line: what the schedule does (the CLI and the config docs print it)."""
    placement: str | None = "loop"
    """The stage -> rank map it needs (``Placement.kind``); None: whichever the caller says."""
    split_backward: bool = False
    """Whether it runs BackwardInput/BackwardWeight (possibly mixed with full Backwards)."""
    training: bool = True
    """False for forward-only schedules (no backward, reduce or step)."""
    chunks: tuple[int, ...] | None = (1,)
    """Model chunks per rank it runs (``virtual_stages``); None: any."""
    check: Check | None = None
    """Constraints beyond chunks, raising ScheduleError with the fix."""
    hints: PlannerHints | None = None
    """For the planner's screen; None: the planner never proposes it."""

    def check_chunks(self, virtual_stages: int) -> None:
        """Refuse a chunk count this schedule does not run, naming the schedules that do."""
        if self.chunks is None or virtual_stages in self.chunks:
            return
        if self.chunks == (1,):
            others = [s.name for s in SCHEDULES.values() if s.training and s.accepts_chunks(virtual_stages)]
            raise ScheduleError(
                f"{self.name} runs one model chunk per rank, got virtual_stages={virtual_stages}; set "
                f"virtual_stages=1 or use a schedule that runs {virtual_stages} chunks per rank "
                f"({', '.join(repr(n) for n in others)})")
        wanted = " or ".join(map(str, self.chunks))
        raise ScheduleError(
            f"{self.name} runs {wanted} model chunks per rank, got virtual_stages={virtual_stages}; set "
            f"virtual_stages={self.chunks[0]}" + (f" and build the PipelineModule with virtual_stages="
                                                  f"{self.chunks[0]}, stage_placement={self.placement!r}"
                                                  if self.placement != "loop" else ""))

    def accepts_chunks(self, virtual_stages: int) -> bool:
        return self.chunks is None or virtual_stages in self.chunks

    def placement_for(self, virtual_stages: int, requested: str | None = None) -> str:
        """The placement kind to build with: the schedule's own, or the caller's where it has none."""
        if self.placement is None:
            return requested or "loop"
        if requested is not None and requested != self.placement and virtual_stages > 1:
            raise ScheduleError(
                f"{self.name} places model stages {self.placement!r}, got placement {requested!r}; build the "
                f"PipelineModule with stage_placement={self.placement!r}")
        return self.placement


def _loop_pipeline(p: int, m: int, v: int, f: float, b: float, w: float) -> float:
    return (m * v + p - 1) * (f + b + w)  # GPipe, 1F1B, interleaved: (p-1) slots of a whole F+B


def _zb_h1_pipeline(p: int, m: int, v: int, f: float, b: float, w: float) -> float:
    return m * (f + b + w) + (p - 1) * max(f + b - w, 0.0)  # W fills all but F+B-W per stage

_SPECS = (
    ScheduleSpec("gpipe", gpipe.compute_order, "all forwards, then all backwards; holds every micro-batch",
                 hints=PlannerHints(_loop_pipeline, lambda p, m, v: m)),
    ScheduleSpec("1f1b", one_f_one_b.compute_order, "one forward, one backward; at most p micro-batches held",
                 hints=PlannerHints(_loop_pipeline, lambda p, m, v: min(m, p))),
    ScheduleSpec("interleaved_1f1b", interleaved.compute_order,
                 "1F1B over v chunks per rank placed in a loop; bubble / v, v times the messages",
                 chunks=None, check=interleaved.check,
                 hints=PlannerHints(_loop_pipeline, lambda p, m, v: min(m, 2 * p if v > 1 else p))),
    ScheduleSpec("zb_h1", zero_bubble.compute_order, "1F1B with the weight gradient deferred into the bubble",
                 split_backward=True, hints=PlannerHints(_zb_h1_pipeline, lambda p, m, v: min(m, p))),
    ScheduleSpec("zb_v", zb_v.compute_order, "zero-bubble V: 2 chunks per rank placed 'v', 1F1B's memory",
                 placement="v", split_backward=True, chunks=(2,),
                 hints=PlannerHints(zb_v.pipeline_seconds, lambda p, m, v: min(m, p), steady=2)),
    ScheduleSpec("dualpipev", dualpipev.compute_order,
                 "DeepSeek's DualPipeV: 2 chunks placed 'v', forward/backward pairs of both chunks",
                 placement="v", split_backward=True, chunks=(2,), check=dualpipev.check,
                 hints=PlannerHints(dualpipev.pipeline_seconds, lambda p, m, v: min(m, p + 1), steady=2)),
    ScheduleSpec("inference", inference.compute_order, "forward only, micro-batches streamed in order",
                 placement=None, training=False, chunks=None),
)
SCHEDULES: dict[str, ScheduleSpec] = {spec.name: spec for spec in _SPECS}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)
TRAINING_SCHEDULES: tuple[str, ...] = tuple(name for name, spec in SCHEDULES.items() if spec.training)


def get(name: str) -> ScheduleSpec:
    """The record of schedule ``name``; ScheduleError naming the choices otherwise."""
    spec = SCHEDULES.get(name)
    if spec is None:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return spec


def stage_placement(schedule: Any) -> str:
    """The ``stage_placement`` to build a PipelineModule with for ``schedule``: a config's
    ``schedule`` section (its ``name`` and ``virtual_stages``) or a schedule's name.

    ``PipelineModule(..., virtual_stages=cfg.schedule.virtual_stages,
    stage_placement=pg.stage_placement(cfg.schedule))`` builds a module every schedule
    preset runs, so an app switches to ``schedule=zb_v`` with one override.
    """
    name = schedule if isinstance(schedule, str) else schedule.name
    virtual_stages = 1 if isinstance(schedule, str) else schedule.virtual_stages
    return get(name).placement_for(virtual_stages)
