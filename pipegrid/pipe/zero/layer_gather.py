"""``zero.gather: per_layer``: ZeRO-3's parameters gathered one layer at a time, just before each
use, and freed after it, with the next layer's gather in flight while the current one computes.

    forward   use(l): wait l's gather, post l+1's ─► layer l ─► free l
    backward  l's output gradient arrives: use(l), post l-1's ─► l's backward ─► l's input
              gradient arrives: free l
    W         (split backward) before each W call: its layers gathered again, the next call's posted
    recompute (activation checkpointing, inside backward) use(l), kept until l's backward frees it

A layer ("unit") is one module a stage position runs (a tied module is one unit wherever it
sits); its parameters are consecutive in ZeRO-1's flat layout, so its buffer is that layout's
range [a, b) and each piece of it that falls in data rank r's shard is broadcast from rank r
(one or two broadcasts for a layer smaller than a shard). The shards, the optimizer and
checkpoints stay exactly ZeRO-3's: only where the whole parameters live changes.

Freeing shrinks the buffer's storage to nothing and gathering grows it back (FSDP1's trick):
the parameters stay views of the same storage, so what autograd saved for backward (the
weights themselves, views of them) sees the gathered values again when it runs. Whatever is
still gathered at the end of a backward instruction (a first layer whose input needs no
gradient) or of the optimizer step is freed then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pipegrid import kernels


class _Unit:
    """One layer's parameters: the flat layout's range [lo, hi) in a buffer of their own."""

    def __init__(self, name: str, indices: list[int], lo: int, hi: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.name, self.indices, self.lo, self.hi = name, indices, lo, hi
        self.buffer = torch.zeros(hi - lo, dtype=dtype, device=device)
        self.nbytes = self.buffer.untyped_storage().nbytes()
        self.gathered = True
        self.in_flight: list[Any] = []
        """The async broadcasts filling the buffer, waited for at its use."""


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (activation checkpointing's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _grad_tensors(value: Any) -> list[torch.Tensor]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


class LayerGather:
    """Gathers, prefetches and frees each layer's parameters of a ZeRO-3 rank (module docstring).

    ``params``/``layout``: the optimizer's flat layout; ``shard``: this rank's master shard, owning
    [shard_lo, shard_lo + shard_size) of it; ``chunks``: the rank's StageChunks, whose layer calls
    are wrapped here.
    """

    def __init__(self, params: list[torch.nn.Parameter], layout: kernels.FlatLayout, shard: torch.Tensor,
                 shard_lo: int, shard_size: int, group: Any, data_size: int, data_rank: int,
                 param_flat: torch.Tensor, chunks: Sequence[Any]) -> None:
        self.shard, self.shard_lo, self.shard_size = shard, shard_lo, shard_size
        self.group, self.data_size, self.data_rank = group, data_size, data_rank
        self.layout = layout
        self.units: dict[int, _Unit] = {}  # id(module) -> the unit of the parameters it brought first
        self._unit_of_param: dict[int, _Unit] = {}
        self._build_units(params, chunks, param_flat)
        self.gathered_bytes = sum(u.nbytes for u in self.units.values())
        self.peak_bytes = 0
        """The most parameter bytes gathered at once since the last ``reset_peak``."""
        self.release_all()
        self.reset_peak()
        for chunk in chunks:
            order = [self._needs(layer) for _, layer in chunk_layers(chunk)]
            chunk.wrap_layer_calls(lambda position, call, order=order: self._wrapped(call, order, position))

    # --- set-up -----------------------------------------------------------------
    def _build_units(self, params: list[torch.nn.Parameter], chunks: Sequence[Any],
                     param_flat: torch.Tensor) -> None:
        index = {id(p): i for i, p in enumerate(params)}
        for chunk in chunks:
            for layer_index, layer in chunk_layers(chunk):
                if not isinstance(layer, torch.nn.Module) or id(layer) in self.units:
                    continue
                own = sorted({index[id(p)] for p in layer.parameters() if id(p) in index}
                             - {i for u in self.units.values() for i in u.indices})
                if not own:
                    continue
                if own != list(range(own[0], own[-1] + 1)):
                    raise RuntimeError(f"zero.gather=per_layer: layer {layer_index} ({type(layer).__name__}) shares "
                                       "parameters with a layer elsewhere in the stage, so its own are not one "
                                       "range of the flat buffer; use zero.gather=per_step")
                lo = self.layout.offsets[own[0]]
                hi = self.layout.offsets[own[-1]] + self.layout.numels[own[-1]]
                unit = _Unit(f"layer {layer_index}", own, lo, hi, param_flat.dtype, param_flat.device)
                unit.buffer.copy_(param_flat[lo:hi])
                self.units[id(layer)] = unit
                with torch.no_grad():
                    for i in own:
                        offset = self.layout.offsets[i] - lo
                        params[i].data = torch.as_strided(unit.buffer, self.layout.shapes[i],
                                                          self.layout.strides[i], offset)
                        self._unit_of_param[id(params[i])] = unit
        missing = [i for i, p in enumerate(params) if id(p) not in self._unit_of_param]
        if missing:
            raise RuntimeError(f"zero.gather=per_layer: parameters {missing} belong to no layer a stage runs; "
                               "use zero.gather=per_step")

    # --- gather, use, free ---------------------------------------------------------
    def post(self, units: Sequence[_Unit]) -> None:
        """Start gathering ``units`` (the own piece copied from the master shard, the others broadcast
        by their owners, asynchronously); a no-op for one gathered or on its way."""
        for unit in units:
            if not unit.gathered:
                self._post_one(unit)

    def _post_one(self, unit: _Unit) -> None:
        unit.buffer.untyped_storage().resize_(unit.nbytes)
        unit.gathered = True
        self.gathered_bytes += unit.nbytes
        self.peak_bytes = max(self.peak_bytes, self.gathered_bytes)
        for owner in range(self.data_size):
            lo = max(unit.lo, owner * self.shard_size)
            hi = min(unit.hi, (owner + 1) * self.shard_size)
            if lo >= hi:
                continue
            piece = unit.buffer[lo - unit.lo:hi - unit.lo]
            if owner == self.data_rank:
                piece.copy_(self.shard.detach()[lo - self.shard_lo:hi - self.shard_lo])
            if self.data_size > 1:
                unit.in_flight.append(dist.broadcast(piece, group=self.group, group_src=owner, async_op=True))

    def use(self, units: Sequence[_Unit]) -> None:
        """``units``' parameters whole, now."""
        self.post(units)
        self._wait(units)

    def _wait(self, units: Sequence[_Unit]) -> None:
        for unit in units:
            for work in unit.in_flight:
                work.wait()
            unit.in_flight.clear()

    def release(self, units: Sequence[_Unit]) -> None:
        self._wait(units)  # (a broadcast still writing into a buffer finishes first)
        for unit in units:
            if unit.gathered:
                unit.buffer.untyped_storage().resize_(0)
                unit.gathered = False
                self.gathered_bytes -= unit.nbytes

    def gather_all(self) -> None:
        self.use(list(self.units.values()))

    def release_all(self) -> None:
        self.release(list(self.units.values()))

    def gather_for(self, params: Sequence[torch.Tensor], following: Sequence[torch.Tensor] = ()) -> None:
        """The layers holding ``params`` whole (a split backward's W call computes their
        gradients), every other layer freed, those holding ``following`` (the next call's) posted."""
        needed = self._units_of(params)
        self.release([u for u in self.units.values() if u not in needed])
        self.use(needed)
        self.post(self._units_of(following))

    def _units_of(self, params: Sequence[torch.Tensor]) -> list[_Unit]:
        return list({id(u): u for p in params if (u := self._unit_of_param.get(id(p))) is not None}.values())

    def reset_peak(self) -> None:
        self.peak_bytes = self.gathered_bytes

    # --- the wrapped layer calls ------------------------------------------------------
    def _needs(self, layer: Any) -> tuple[_Unit, ...]:
        """The units holding ``layer``'s parameters (its own, and any it shares with another layer)."""
        if not isinstance(layer, torch.nn.Module):
            return ()
        units = {id(u): u for p in layer.parameters() if (u := self._unit_of_param.get(id(p))) is not None}
        return tuple(units.values())

    def _wrapped(self, call: Callable[[Any], Any], order: list[tuple[_Unit, ...]],
                 position: int) -> Callable[[Any], Any]:
        units = order[position]
        if not units:
            return call
        following = _nearest(order[position + 1:], units)
        preceding = _nearest(order[position - 1::-1] if position else [], units)
        before_preceding = _nearest(order[order.index(preceding) - 1::-1], preceding) \
            if preceding and order.index(preceding) else ()
        last = not any(order[position + 1:])

        def run(x: Any) -> Any:
            self.use(units)
            if _in_backward():  # recomputing a checkpointed forward: its own backward frees the layer
                return call(x)
            self.post(following)  # while this layer computes
            if torch.is_grad_enabled():
                # the input's gradient: this layer's backward is done, the one before starts
                for t in _grad_tensors(x):
                    t.register_hook(self._backward_hook(units, preceding, before_preceding))
            out = call(x)
            if torch.is_grad_enabled() and last:  # the output's gradient: this layer's backward starts
                for t in _grad_tensors(out):
                    t.register_hook(self._backward_hook((), units, preceding))
            self.release(units)
            return out
        return run

    def _backward_hook(self, done: tuple[_Unit, ...], starting: tuple[_Unit, ...],
                       next_up: tuple[_Unit, ...]) -> Callable[[torch.Tensor], None]:
        """Free the layer whose backward is done, gather the one starting, post the one after it."""
        def hook(grad: torch.Tensor) -> None:
            self.release([u for u in done if u not in starting])
            self.use(starting)
            self.post(next_up)
        return hook

    def own_slice(self, out: torch.Tensor) -> torch.Tensor:
        """Write this rank's range of the (gathered) parameters into ``out`` (the shard's size)."""
        out.zero_()
        for unit in self.units.values():
            lo, hi = max(unit.lo, self.shard_lo), min(unit.hi, self.shard_lo + self.shard_size)
            if lo < hi:
                out[lo - self.shard_lo:hi - self.shard_lo].copy_(unit.buffer[lo - unit.lo:hi - unit.lo])
        return out


def _nearest(positions: Sequence[tuple[_Unit, ...]], other_than: tuple[_Unit, ...]) -> tuple[_Unit, ...]:
    """The first positions' units that are some and not ``other_than``'s."""
    return next((u for u in positions if u and u != other_than), ())


def chunk_layers(chunk: Any) -> list[tuple[int, Any]]:
    """(global layer index, module or callable) of each position of a StageChunk, in order."""
    return chunk.layer_entries()
