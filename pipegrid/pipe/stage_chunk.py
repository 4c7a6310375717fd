"""StageChunk: the built layers of one model stage, run in order (with activation
checkpointing every N layers), and the seeding that makes layer i identical in any layout."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipegrid.tensor.random import TensorParallelRNG, checkpoint_context, rng_trackers

__all__ = ["StageChunk", "seeded"]


class Entry(NamedTuple):
    index: int  # global layer index
    layer: Any  # the built module (the shared one for a tied key) or the callable
    call: Callable[[Any], Any]  # how this position runs its input


class StageChunk(nn.Module):
    """The layers of one model stage, run in order; a tuple output is passed whole as
    the next layer's one argument. Modules are registered under their global index
    (``layers["7"]``), so ``parameters()`` includes any tied module used here."""

    def __init__(self, stage: int, entries: list[Entry], checkpoint_interval: int) -> None:
        super().__init__()
        self.stage = stage
        self.layer_indices = [e.index for e in entries]
        self.activation_checkpoint_interval = checkpoint_interval
        self.layers = nn.ModuleDict(
            {str(e.index): e.layer for e in entries if isinstance(e.layer, nn.Module)})
        self._entries = entries
        self._eager_entries = entries  # what generate runs: a KV cache's growing length would recompile
        self._rng_trackers: list[TensorParallelRNG] | None = None  # found on the first checkpointed forward

    def layer_entries(self) -> list[tuple[int, Any]]:
        """(global layer index, module or callable) of each position, in order."""
        return [(e.index, e.layer) for e in self._entries]

    def wrap_layer_calls(self, wrap: Callable[[int, Callable[[Any], Any]], Callable[[Any], Any]]) -> None:
        """Run position k through ``wrap(k, call)`` from now on (ZeRO-3 gathers each layer's
        parameters around its call: pipe/zero/layer_gather.py)."""
        self._entries = [Entry(e.index, e.layer, wrap(k, e.call)) for k, e in enumerate(self._entries)]

    def _run(self, x: Any, start: int, end: int) -> Any:
        for entry in self._entries[start:end]:
            x = entry.call(x)
        return x

    def compile_layers(self, compile_one: Callable[[int, Any, Callable[[Any], Any]], Callable[[Any], Any]]) -> None:
        """Replace each position's call by ``compile_one(index, layer, call)`` (``pipe/compile.py``).

        Modules compile in place, so ``layers`` and its parameter names stay as they were."""
        self._entries = [e._replace(call=compile_one(e.index, e.layer, e.call)) for e in self._entries]

    def forward(self, x: Any) -> Any:
        every = self.activation_checkpoint_interval
        n = len(self._entries)
        if every <= 0 or not torch.is_grad_enabled():
            return self._run(x, 0, n)
        # Non-reentrant checkpointing works for any layer type, for tuple inputs, and
        # for inputs that do not require grad (the reentrant one fails on those).
        # preserve_rng_state replays the default generators only: the tensor-parallel
        # dropout stream is replayed by its own context (tensor/random.py)
        if self._rng_trackers is None:
            self._rng_trackers = rng_trackers(self)
        extra = {"context_fn": checkpoint_context(self._rng_trackers)} if self._rng_trackers else {}
        for start in range(0, n, every):
            x = checkpoint(self._run, x, start, min(start + every, n), use_reentrant=False, **extra)
        return x

    def forward_cached(self, x: Any, cache: Any, step: Any) -> Any:
        """The stage under ``engine.generate``: each layer with its own cache (``pipe/kv_cache.py``).
        A position with a ``forward_fn`` (a tied LM head), torch's position-wise modules and a plain
        callable run as in training; ``forward_cached`` runs eagerly under ``compile.enabled``."""
        from pipegrid.pipe.kv_cache import runs_as_in_training

        for entry in self._eager_entries:
            runs_itself = (entry.call is entry.layer and isinstance(entry.layer, nn.Module)
                           and not runs_as_in_training(entry.layer))
            x = entry.layer.forward_cached(x, cache.for_layer(entry.index), step) if runs_itself else entry.call(x)
        return x


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build under ``seed`` without disturbing the caller's RNG streams."""
    device = torch.get_default_device()
    on_cuda = device.type == "cuda"
    forked = [device.index or 0] if on_cuda else []
    with torch.random.fork_rng(devices=forked):
        torch.random.default_generator.manual_seed(seed)
        if on_cuda:  # layers built straight onto the GPU draw from its generator
            torch.cuda.manual_seed(seed)
        yield
