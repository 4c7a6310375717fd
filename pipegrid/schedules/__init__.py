"""Pipeline schedules as pure data: build, validate, simulate and draw them (no torch here).

``build("1f1b", num_ranks=4, micro_batches=8).streams[rank]`` is what rank runs, in order;
``SCHEDULES[name]`` is everything known about a schedule, ``Placement`` which rank runs a stage.
"""

from __future__ import annotations

from pipegrid.schedules.errors import ScheduleError
from pipegrid.schedules.instructions import (
    Backward, BackwardInput, BackwardWeight, ComputeInstruction, Exchange, Forward, Instruction,
    LoadMicroBatch, MicroBatchInstruction, OptimizerStep, RecvActivation, RecvGrad,
    RecvToken, ReduceGrads, ReduceTiedGrads, SendActivation, SendGrad, SendToken, is_compute, is_recv, is_send,
    message_of, parse_instruction, parts,
)
from pipegrid.schedules.lower import build, lower
from pipegrid.schedules.placement import PLACEMENTS, Placement
from pipegrid.schedules.registry import SCHEDULE_NAMES, SCHEDULES, TRAINING_SCHEDULES, ScheduleSpec
from pipegrid.schedules.render import to_chrome_trace, to_png, to_text
from pipegrid.schedules.schedule import Schedule
from pipegrid.schedules.simulate import DEFAULT_COSTS, Event, SimResult, simulate
from pipegrid.schedules.validate import validate

__all__ = [
    "Backward", "BackwardInput", "BackwardWeight", "ComputeInstruction", "DEFAULT_COSTS",
    "Event", "Exchange", "Forward", "Instruction", "LoadMicroBatch", "MicroBatchInstruction",
    "OptimizerStep", "PLACEMENTS", "Placement", "RecvActivation", "RecvGrad", "RecvToken", "ReduceGrads",
    "ReduceTiedGrads", "SCHEDULES", "SCHEDULE_NAMES", "Schedule", "ScheduleError", "ScheduleSpec",
    "SendActivation", "SendGrad", "SendToken", "SimResult", "TRAINING_SCHEDULES", "build", "is_compute", "lower", "is_recv", "is_send", "message_of", "parse_instruction", "parts",
    "simulate", "to_chrome_trace", "to_png", "to_text", "validate",
]
