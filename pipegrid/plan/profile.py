"""Measured profile: each layer's forward and backward seconds and bytes on this device.

The one planner module that uses torch, imported lazily: ``profile_layers`` builds every
layer of a ``PipelineModule``'s layer list in this process and times it on one micro-batch;
``profile_chunks`` times whole pipeline chunks as the engine runs them (forward, whole
backward, split I and W); ``measure_contention`` measures how much slower a core computes
while its neighbours do too; ``measure_receive_wake`` what a receive posted after its send
costs over one posted before (the simulator's ``wake``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence
from typing import Any

from pipegrid.plan.model import ChunkCost, LayerCost

__all__ = ["profile_layers", "profile_chunks", "measure_contention", "time_optimizer_step", "measure_receive_wake"]


def _bytes(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_bytes(t) for t in x)
    return 0


def _one_pass(calls: Sequence[Any], x: Any) -> tuple[list[float], list[float], list[int], list[Any]]:
    """Forward every layer on its detached input, then backward them last to first: each
    layer timed alone, yet with the whole stack's weights going through the caches."""
    import torch

    from pipegrid.pipe.layer_costs import detached_input

    inputs, outputs, forward, saved = [], [], [], []
    for call in calls:
        inp = detached_input(x)
        held: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(_bytes(t)) or t, lambda t: t):
            start = time.perf_counter()
            out = call(inp)
            forward.append(time.perf_counter() - start)
        inputs.append(inp)
        outputs.append(out)
        saved.append(sum(held))
        x = out
    backward = [0.0] * len(calls)
    grad = torch.ones_like(outputs[-1])
    for i in reversed(range(len(calls))):
        start = time.perf_counter()
        torch.autograd.backward(outputs[i], grad)
        backward[i] = time.perf_counter() - start
        grad = inputs[i].grad
    return forward, backward, saved, [_bytes(o) for o in outputs]


def profile_layers(layers: Sequence[Any], example_input: Any, *, repeats: int = 5,
                   seed: int = 1234) -> list[LayerCost]:
    """Time each layer of a ``PipelineModule`` layer list (LayerSpecs) on ``example_input``
    (one micro-batch, one tensor output per layer), forward and backward separately, in
    this process: the median of ``repeats`` passes over the whole stack after one warm-up."""
    import torch

    from pipegrid.pipe.module import build_reference

    model = build_reference(layers, seed=seed)
    entries = model.stage_module()._entries
    passes = [_one_pass([e.call for e in entries], example_input) for _ in range(repeats + 1)][1:]
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    costs, inp_bytes = [], _bytes(example_input)
    for i, entry in enumerate(entries):
        module = entry.layer if isinstance(entry.layer, torch.nn.Module) else None
        out_bytes = passes[0][3][i]
        costs.append(LayerCost(
            name=type(module).__name__ if module is not None else f"layer{i}",
            parameters=sum(p.numel() for p in module.parameters()) if module is not None else 0,
            forward_s=median([p[0][i] for p in passes]), backward_s=median([p[1][i] for p in passes]),
            activation_bytes=passes[0][2][i], checkpoint_bytes=inp_bytes, output_bytes=out_bytes))
        inp_bytes = out_bytes
    return costs


def profile_chunks(layers: Sequence[Any], chunk_sizes: Sequence[int], example_input: Any, *,
                   loss_fn: Any = None, labels: Any = None, repeats: int = 5, seed: int = 1234,
                   input_grad: bool = False) -> list[ChunkCost]:
    """Time a ``PipelineModule`` layer list cut into consecutive chunks of ``chunk_sizes``
    layers, each chunk as the engine runs one model stage: forward (the last adds
    ``loss_fn(output, labels)``), whole backward, and the split backward's I and W
    (``pipegrid.pipe.split_backward``). The first chunk's input needs no gradient, as the
    data's does not, unless ``input_grad`` (the layers are a later model stage, profiled on
    the rank that holds it). Mean of ``repeats`` passes after one warm-up, in this process."""
    from pipegrid.pipe.module import build_reference

    if sum(chunk_sizes) != len(layers) or min(chunk_sizes, default=0) < 1:
        raise ValueError(f"chunk_sizes {list(chunk_sizes)} must be positive and add up to the "
                         f"{len(layers)} layers; give one size per pipeline chunk")
    entries = build_reference(layers, seed=seed).stage_module()._entries
    chunks, start = [], 0
    for size in chunk_sizes:
        chunks.append(entries[start:start + size])
        start += size
    if input_grad:
        from pipegrid.pipe.layer_costs import detached_input

        example_input = detached_input(example_input)
    passes = [_chunk_pass(chunks, example_input, loss_fn, labels) for _ in range(repeats + 1)][1:]
    return [ChunkCost(*(_mean([p[c][k] for p in passes]) for k in range(4))) for c in range(len(chunks))]


def _mean(values: Sequence[float]) -> float:
    """The mean, not the median: a step pays every op's time, the slow ones (a preempted core,
    a cold cache) too, and the simulator adds costs up as a step does. Fed a traced run's own
    op times, the simulator met the measured step within 10% from means and missed it by
    22-25% from medians (docs/benchmarks.md)."""
    return sum(values) / len(values)


def _run_chunk(chunk: Sequence[Any], x: Any) -> Any:
    for entry in chunk:
        x = entry.call(x)
    return x


def _chunk_forwards(chunks: Sequence[Sequence[Any]], x: Any, loss_fn: Any,
                    labels: Any) -> tuple[list[float], list[Any], list[Any]]:
    """Forward every chunk on its own leaf input (the first on ``x`` as given): seconds, inputs, outputs."""
    from pipegrid.pipe.layer_costs import detached_input

    seconds, inputs, outputs = [], [], []
    for c, chunk in enumerate(chunks):
        inp = x if c == 0 else detached_input(x)
        start = time.perf_counter()
        out = _run_chunk(chunk, inp)
        if c == len(chunks) - 1 and loss_fn is not None:
            out = loss_fn(out, labels)
        seconds.append(time.perf_counter() - start)
        inputs.append(inp)
        outputs.append(out)
        x = out
    return seconds, inputs, outputs


def _chunk_pass(chunks: Sequence[Sequence[Any]], x: Any, loss_fn: Any,
                labels: Any) -> list[tuple[float, float, float, float]]:
    """(forward, whole backward, I, W) seconds per chunk: one sweep backward whole, one split."""
    import torch

    from pipegrid.pipe.split_backward import backward_input, backward_weight

    fwd_whole, inputs, outputs = _chunk_forwards(chunks, x, loss_fn, labels)
    whole = [0.0] * len(chunks)
    grad = None if loss_fn is not None else torch.ones_like(outputs[-1])
    for c in reversed(range(len(chunks))):
        start = time.perf_counter()
        torch.autograd.backward(outputs[c], grad)
        whole[c] = time.perf_counter() - start
        grad = inputs[c].grad
    fwd_split, inputs, outputs = _chunk_forwards(chunks, x, loss_fn, labels)
    split_i, states = [0.0] * len(chunks), [None] * len(chunks)
    grad = None if loss_fn is not None else torch.ones_like(outputs[-1])
    for c in reversed(range(len(chunks))):
        params = [p for entry in chunks[c] if isinstance(entry.layer, torch.nn.Module)
                  for p in entry.layer.parameters() if p.requires_grad]
        leaves = [t for t in (inputs[c],) if isinstance(t, torch.Tensor) and t.requires_grad]
        start = time.perf_counter()
        grads, states[c] = backward_input([outputs[c]], [grad], leaves, params)
        split_i[c] = time.perf_counter() - start
        grad = grads[0] if grads else None
    split_w = [0.0] * len(chunks)
    for c in reversed(range(len(chunks))):  # W waits for the bubbles, after every I of the sweep
        start = time.perf_counter()
        backward_weight(states[c])
        split_w[c] = time.perf_counter() - start
    return [((fwd_whole[c] + fwd_split[c]) / 2, whole[c], split_i[c], split_w[c]) for c in range(len(chunks))]


def time_optimizer_step(parameters: int, factory: str = "torch.optim.Adam", repeats: int = 3) -> float:
    """Seconds of one optimizer step over ``parameters`` float32 parameters (fastest of repeats),
    built as the engine builds it (fused where torch has the kernel)."""
    import torch

    from pipegrid.pipe.optimizer_build import build_optimizer

    weight = torch.nn.Parameter(torch.zeros(parameters))
    weight.grad = torch.ones(parameters)
    optimizer = build_optimizer({"_target_": factory, "lr": 1e-4}, [weight])
    best = float("inf")
    for _ in range(repeats + 1):  # the first step allocates the state
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_seconds(size: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(size, size)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median: contention is what is measured


def _worker(size: int, repeats: int, barrier: Any, queue: Any) -> None:
    from pipegrid.topology.devices import (
        hide_gpus,  # (imports torch, as this module does only when used)
    )

    hide_gpus()  # a CPU measurement: nothing here may touch the parent's CUDA
    barrier.wait()
    queue.put(_matmul_seconds(size, repeats))


def measure_contention(processes: int = 2, size: int = 512, repeats: int = 20) -> float:
    """How much slower one process computes while ``processes`` compute at once (>= 1):
    median matmul time of the busy processes over one process's (forked, one thread each)."""
    from pipegrid.topology.devices import refuse_fork_after_cuda

    refuse_fork_after_cuda("pipegrid.plan measure_contention")
    ctx = mp.get_context("fork")
    alone = _run(ctx, 1, size, repeats)
    together = _run(ctx, processes, size, repeats)
    return max(1.0, sum(together) / len(together) / alone[0])


def _run(ctx: Any, count: int, size: int, repeats: int) -> list[float]:
    barrier, queue = ctx.Barrier(count), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(size, repeats, barrier, queue)) for _ in range(count)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    return results


def _matmuls(a: Any, seconds: float) -> None:
    """Keep this core busy for about ``seconds`` with small matmuls (as a stage computes)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def _wake_rank(nbytes: int, busy_s: float, repeats: int) -> dict[str, float]:
    """Rank 1 computes, sends, computes on; rank 0 posts the receive before the send (early) or
    after it (late) and times its wait. Both bound to a core each, as the engine binds its ranks."""
    import statistics

    import torch
    import torch.distributed as dist

    from pipegrid.topology.affinity import bind_cores

    bind_cores()
    torch.set_num_threads(1)
    a, message = torch.randn(128, 128), torch.zeros(max(nbytes // 4, 1))
    waits: dict[str, list[float]] = {"early": [], "late": []}
    for i in range(2 * repeats):  # alternate, so drifting load hits both alike
        when = "early" if i % 2 == 0 else "late"
        dist.barrier()
        if dist.get_rank() == 1:
            _matmuls(a, busy_s)
            dist.isend(message, 0).wait()
            _matmuls(a, 3 * busy_s)  # busy when the late receive asks for the data
            continue
        work = dist.irecv(message, 1) if when == "early" else None
        _matmuls(a, 2 * busy_s)  # the send has been posted by now
        work = work or dist.irecv(message, 1)
        start = time.perf_counter()
        work.wait()
        waits[when].append(time.perf_counter() - start)
    return {when: statistics.median(ts) if ts else 0.0 for when, ts in waits.items()}


def measure_receive_wake(nbytes: int = 32768, busy_s: float = 0.003, repeats: int = 30) -> float:
    """Seconds a message of ``nbytes`` waits when its receive is posted after its send, over one
    posted before, between two processes that compute on a core each (gloo): the receiver asks,
    and the sender's progress thread must wake on the sender's busy core to write. The median of
    ``repeats`` alternating pairs; >= 0."""
    from pipegrid.launch import run_local
    from pipegrid.topology.devices import refuse_fork_after_cuda

    refuse_fork_after_cuda("pipegrid.plan measure_receive_wake")
    waits = run_local(_wake_rank, 2, (nbytes, busy_s, repeats), timeout_s=120)[0]
    return max(waits["late"] - waits["early"], 0.0)
