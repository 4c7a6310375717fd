"""The tensor-parallel RNG stream (Megatron-LM's ``CudaRNGStatesTracker``): dropout whose masks must
differ across tensor ranks draws from it, everything else from the default generator.

Tensor ranks hold one hidden state between the regions and must draw the same masks there (the
default generator, the same on every tensor rank). Inside a region they hold different things:
their own heads (core attention) or, under sequence parallelism, their own chunk of the sequence.
One shared stream would give heads ``h`` and ``h + H/t``, or every chunk, the same mask. So a
model holds one :class:`TensorParallelRNG` per process, seeded ``seed + 2718 + 100 * pipe_rank +
tensor_rank`` (Megatron's offsets: the same on every data rank), and runs exactly those regions
under :meth:`TensorParallelRNG.fork`, which swaps its state into the default generator and back.

Activation checkpointing recomputes with the default generators as they were; the stream's own
state is put back too (:func:`checkpoint_context`), and checkpoints save it (:func:`rng_trackers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipegrid.tensor.mappings import Group, _active, tensor_parallel_rank

__all__ = ["TensorParallelRNG", "checkpoint_context", "rng_trackers"]

TENSOR_PARALLEL_OFFSET = 2718  # Megatron's: far from the seeds of layer init (seed + layer index)
PIPE_RANK_STRIDE = 100  # Megatron's: each pipe rank its own streams


class TensorParallelRNG:
    """One process's tensor-parallel dropout stream (CPU, and the current CUDA device's once used).

    Inactive (every ``fork`` a no-op) without a tensor group of two or more ranks, so tensor 1 runs
    exactly as without it. Modules that draw from it expose it as ``tensor_parallel_rng``, which is
    how activation checkpointing and checkpoints find it."""

    def __init__(self, group: Group = None, seed: int = 1234, pipe_rank: int = 0) -> None:
        self.group = group
        self.active = _active(group) is not None
        self._depth = 0  # forks nest: an inner one (attention inside a forked block) draws on
        self.manual_seed(seed, pipe_rank)

    def manual_seed(self, seed: int, pipe_rank: int = 0) -> None:
        """Restart the stream at ``seed + 2718 + 100 * pipe_rank + tensor_rank``."""
        rank = tensor_parallel_rank(self.group) if self.active else 0
        self.seed = seed + TENSOR_PARALLEL_OFFSET + PIPE_RANK_STRIDE * pipe_rank + rank
        self._cpu = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda: torch.Tensor | None = None  # made on the first fork that finds CUDA in use

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from this stream within the block; the default generators continue afterwards as if
        the block had drawn nothing."""
        if not self.active or self._depth:
            yield
            return
        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(self._cpu)
        if on_cuda:
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(self._cuda_state())
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if on_cuda:
                self._cuda = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)

    # not traced into a caller's graph, whose RNG seeds were drawn at its entry: the swap runs eagerly,
    # and a compiled ``fn`` (a frame of its own) draws its seeds inside the fork
    @torch.compiler.disable(recursive=False)
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under :meth:`fork`; callable from compiled layers."""
        with self.fork():
            return fn(*args, **kwargs)

    def _cuda_state(self) -> torch.Tensor:
        if self._cuda is None:
            generator = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
            self._cuda = generator.manual_seed(self.seed).get_state()
        return self._cuda

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Where the stream is (copies): checkpoints save it beside the default generators'."""
        state = {"cpu": self._cpu.clone()}
        if self._cuda is not None:
            state["cuda"] = self._cuda.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict` (refused inside a fork, which would overwrite it)."""
        if self._depth:
            raise RuntimeError("TensorParallelRNG.load_state_dict inside its own fork(); load it outside the block")
        self._cpu = state["cpu"].clone()
        self._cuda = state["cuda"].clone() if "cuda" in state else None

    def __repr__(self) -> str:
        return f"TensorParallelRNG(seed={self.seed}, active={self.active})"


def rng_trackers(module: nn.Module) -> list[TensorParallelRNG]:
    """The distinct active streams ``module``'s submodules draw from (``tensor_parallel_rng``), in order."""
    found: dict[int, TensorParallelRNG] = {}
    for sub in module.modules():
        tracker = getattr(sub, "tensor_parallel_rng", None)
        if isinstance(tracker, TensorParallelRNG) and tracker.active:
            found.setdefault(id(tracker), tracker)
    return list(found.values())


def checkpoint_context(trackers: list[TensorParallelRNG]) -> Callable[[], tuple[Any, Any]]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recompute starts each
    stream where the forward started it, so it redraws the same masks, and leaves the stream where
    it was before the recompute (later forwards of other micro-batches have moved it on)."""

    def context_fn() -> tuple[Any, Any]:
        at_forward = [tracker.state_dict() for tracker in trackers]  # called as the forward starts

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = [tracker.state_dict() for tracker in trackers]
            for tracker, state in zip(trackers, at_forward):
                tracker.load_state_dict(state)
            try:
                yield
            finally:
                for tracker, state in zip(trackers, now):
                    tracker.load_state_dict(state)

        return contextlib.nullcontext(), recompute()

    return context_fn
