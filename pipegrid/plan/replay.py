"""Op costs measured in a rank's own order: ``profile_stream`` replays the compute instructions of
one rank's schedule stream (no communication) and times every op where the schedule puts it.

Why not each chunk on its own (``profile.profile_chunks``): on a CPU an op's time depends on what
ran before it. A weight-gradient half (W) that a zero-bubble schedule defers past other ops finds
its gradient buffers and saved inputs out of cache, and a rank that holds two chunks keeps both
in memory. On the 2-core machine the isolated profile put W 10-30% below what the engine's trace
measured, and predicted every schedule 5-11% fast; the simulator fed the engine's own op costs
was within 4% (docs/schedules.md, "What the cost model knows"). The replay keeps the schedule's
order, its activations in flight and the rank's whole working set, so it pays what the engine pays.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipegrid.plan.model import ChunkCost
from pipegrid.schedules.instructions import Backward, BackwardInput, BackwardWeight, Forward, Instruction

__all__ = ["StreamReplay", "profile_stream", "stream_chunk_costs"]


def profile_stream(stream: Sequence[Instruction], stage_layers: Mapping[int, Sequence[Any]],
                   example_inputs: Mapping[int, Any], *, last_stage: int, loss_fn: Any = None,
                   labels: Any = None, repeats: int = 3, seed: int = 1234) -> dict[int, ChunkCost]:
    """Mean seconds of every compute op kind per model stage, replaying ``stream`` ``repeats``
    times after one warm-up (``StreamReplay``, whose arguments these are)."""
    replay = StreamReplay(stream, stage_layers, example_inputs, last_stage=last_stage, loss_fn=loss_fn,
                          labels=labels, seed=seed)
    for sweep in range(repeats + 1):
        replay.sweep(record=sweep > 0)  # the first sweep warms caches and allocators
    return replay.costs()


class StreamReplay:
    """One rank's compute stream, built once and replayed sweep by sweep: several schedules'
    replays can alternate, so a load transient on a shared machine hits all of them alike.

    ``stream``: one rank's ``Schedule.streams[rank]`` (transfers and the optimizer step are
    skipped). ``stage_layers[s]``: the LayerSpecs of each model stage the rank holds;
    ``example_inputs[s]``: a micro-batch's input to stage s (a received activation stands in as a
    fresh leaf; stage 0's input needs no gradient, as the data's does not). A received gradient
    is a tensor of ones. ``last_stage`` adds ``loss_fn(output, labels)`` to its forward. Each
    sweep starts without gradients, as a step does after the engine's ``zero_grad``: a stage's
    first backward then writes its gradients instead of adding to them (a quarter cheaper here).
    """

    def __init__(self, stream: Sequence[Instruction], stage_layers: Mapping[int, Sequence[Any]],
                 example_inputs: Mapping[int, Any], *, last_stage: int, loss_fn: Any = None,
                 labels: Any = None, seed: int = 1234) -> None:
        import torch

        from pipegrid.pipe.module import build_reference

        self.compute = [op for op in stream if isinstance(op, (Forward, Backward, BackwardInput, BackwardWeight))]
        missing = sorted({op.stage for op in self.compute} - set(stage_layers))
        if missing:
            raise ValueError(f"the stream runs model stages {missing} but stage_layers has only "
                             f"{sorted(stage_layers)}; give the layers of every stage this rank holds")
        self.entries = {s: build_reference(layers, seed=seed).stage_module()._entries
                        for s, layers in stage_layers.items()}
        self.params = {s: [p for e in es if isinstance(e.layer, torch.nn.Module) for p in e.layer.parameters()
                           if p.requires_grad] for s, es in self.entries.items()}
        self.example_inputs, self.last_stage, self.loss_fn, self.labels = example_inputs, last_stage, loss_fn, labels
        self.seconds: dict[tuple[int, str], list[float]] = defaultdict(list)

    def sweep(self, record: bool = True) -> None:
        """Run the stream's compute once, from fresh gradients; keep its op times if ``record``."""
        for tensor in (p for ps in self.params.values() for p in ps):
            tensor.grad = None  # as the engine's zero_grad: a step's first backward writes fresh gradients
        taken = _replay(self.compute, self.entries, self.params, self.example_inputs, self.last_stage,
                        self.loss_fn, self.labels)
        for key, values in taken.items():
            if record:
                self.seconds[key].extend(values)

    def costs(self) -> dict[int, ChunkCost]:
        """``ChunkCost`` per model stage from the recorded sweeps' mean op times."""
        if not self.seconds:
            raise RuntimeError("no sweep was recorded; call sweep(record=True) at least once before costs()")
        return stream_chunk_costs({key: sum(v) / len(v) for key, v in self.seconds.items()})


def stream_chunk_costs(mean_s: Mapping[tuple[int, str], float]) -> dict[int, ChunkCost]:
    """``ChunkCost`` per stage from mean seconds per (stage, op code F/B/I/W). ``backward_s`` is
    the measured whole backward B where the stream runs one, else I + W (a stage it always
    splits); ``input_s``/``weight_s`` are the measured halves, 0 where it never splits."""
    out = {}
    for stage in sorted({s for s, _ in mean_s}):
        get = lambda code: mean_s.get((stage, code))  # noqa: E731
        split = get("I") is not None or get("W") is not None
        whole = get("B")
        input_s, weight_s = (get("I") or 0.0, get("W") or 0.0) if split else (0.0, 0.0)
        out[stage] = ChunkCost(forward_s=get("F") or 0.0,
                               backward_s=whole if whole is not None else input_s + weight_s,
                               input_s=input_s, weight_s=weight_s)
    return out


def _replay(compute: Sequence[Instruction], entries: Mapping[int, Sequence[Any]],
            params: Mapping[int, list[Any]], example_inputs: Mapping[int, Any], last_stage: int,
            loss_fn: Any, labels: Any) -> dict[tuple[int, str], list[float]]:
    """One sweep over the stream's compute ops: seconds per (stage, code), in stream order."""
    import torch

    from pipegrid.pipe.layer_costs import detached_input
    from pipegrid.pipe.split_backward import backward_input, backward_weight

    held: dict[tuple[int, int], tuple[Any, Any, Any]] = {}  # (stage, mb) -> input, output, gradient
    deferred: dict[tuple[int, int], Any] = {}  # (stage, mb) -> what its W needs
    taken: dict[tuple[int, str], list[float]] = defaultdict(list)
    for op in compute:
        key = (op.stage, op.micro_batch)
        if isinstance(op, Forward):
            inp = example_inputs[op.stage] if op.stage == 0 else detached_input(example_inputs[op.stage])
            start = time.perf_counter()
            out = inp
            for entry in entries[op.stage]:
                out = entry.call(out)
            if op.stage == last_stage and loss_fn is not None:
                out = loss_fn(out, labels)
            taken[(op.stage, "F")].append(time.perf_counter() - start)
            grad = None if op.stage == last_stage and loss_fn is not None else torch.ones_like(out)
            held[key] = (inp, out, grad)
            continue
        start = time.perf_counter()
        if isinstance(op, BackwardWeight):
            backward_weight(deferred.pop(key))
        else:
            inp, out, grad = held.pop(key)
            if isinstance(op, Backward):
                torch.autograd.backward(out, grad)
            else:
                leaves = [inp] if isinstance(inp, torch.Tensor) and inp.requires_grad else []
                _, deferred[key] = backward_input([out], [grad], leaves, params[op.stage])
        taken[(op.stage, op.code)].append(time.perf_counter() - start)
    return taken
