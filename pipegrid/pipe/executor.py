"""Runs one rank's instruction stream: one small handler per instruction type.

The stream comes from ``pipegrid.schedules`` as is (one source of truth): what moves
together, and which gradient message carries the step's loss, is written in it. The
handlers only move tensors between the stage module, the data iterator, the
point-to-point layer and the reduce/step hooks of ``StepHooks`` (the engine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.pipe.p2p import P2P, Incoming, Outgoing
from pipegrid.pipe.step import StepHooks, StepLoss, StepState
from pipegrid.pipe.split_backward import backward_input, backward_weight
from pipegrid.schedules import instructions as ins
from pipegrid.schedules.schedule import Schedule

__all__ = ["Executor", "PeerLostError", "StepHooks", "StepLoss", "StepState", "is_transport_failure",
           "lost_peer_message"]


def as_message(value: Any, where: str) -> tuple[tuple[torch.Tensor, ...], bool]:
    """A stage output as (tensors, was_tuple); anything but tensors is refused."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{where} returned {type(item).__name__} at position {i}; stages may pass only "
                            "a tensor or a tuple of tensors to the next stage")
    return tuple(items), isinstance(value, (tuple, list))


def from_message(tensors: tuple[torch.Tensor, ...], was_tuple: bool) -> Any:
    return tensors if was_tuple else tensors[0]


def _as_grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """A received activation becomes a leaf that collects its gradient (floats only)."""
    t = t.detach()
    return t.requires_grad_(True) if t.is_floating_point() or t.is_complex() else t


_RANK_OPS = (ins.ReduceTiedGrads, ins.ReduceGrads, ins.OptimizerStep)


class PeerLostError(RuntimeError):
    """Communication with another rank failed mid-step; the message names that rank."""


# NCCL and the stores raise DistError; gloo reports a lost peer as a plain RuntimeError
# whose words say so. Any other error raised around a send, a receive or a collective
# (pipegrid's own, a user's optimizer argument) is its own news and keeps its type.
_TRANSPORT_WORDS = ("gloo/transport", "connection", "reset by peer", "broken pipe", "timed out",
                    "pair closure", "read error", "write error")


def is_transport_failure(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributed's report of a lost or unreachable peer."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _TRANSPORT_WORDS)


def lost_peer_message(rank: int, pipe_rank: int, peer: str, when: str, error: BaseException,
                      applied: bool = False) -> str:
    """What a PeerLostError says: who lost whom, when, the transport's words, and what to do."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    step = "the step was applied" if applied else "the step was not applied"
    return (f"rank {rank} (pipe rank {pipe_rank}) lost {peer} {when}: {first_line}. That rank has died or "
            f"hung (its own log shows why); {step}. Restart from the last checkpoint (torchrun "
            "--max-restarts does it) after fixing the cause.")


class Executor:
    """Executes ``schedule.streams[pipe_rank]`` against a PipelineModule and a P2P layer."""

    # instruction type -> handler method, resolved once when the executor is built
    HANDLERS: dict[type, str] = {
        ins.LoadMicroBatch: "_load", ins.Forward: "_forward", ins.Backward: "_backward",
        ins.BackwardInput: "_backward", ins.BackwardWeight: "_backward_weight",
        ins.SendActivation: "_transfer", ins.RecvActivation: "_transfer", ins.SendGrad: "_transfer",
        ins.RecvGrad: "_transfer", ins.Exchange: "_transfer",
        ins.ReduceTiedGrads: "_reduce_tied_grads", ins.ReduceGrads: "_reduce_grads",
        ins.OptimizerStep: "_optimizer_step",
    }

    def __init__(self, schedule: Schedule, pipe_rank: int, module: Any, p2p: P2P,
                 pipe_peers: Sequence[int], rank: int) -> None:
        """``pipe_peers[r]``: the global rank of pipe rank r in this rank's pipeline; ``rank``: this
        rank's. The executor keeps no reference to the engine: its hooks come with each ``run``."""
        self.module = module
        self.p2p = p2p
        self.schedule = schedule
        self.pipe_rank = pipe_rank
        self.rank = rank
        self.pipe_peers = tuple(pipe_peers)
        self.stream = schedule.streams[pipe_rank]
        self.last_stage = schedule.num_model_stages - 1
        self._said_early: set[int] = set()  # model stages whose split backward's fallbacks were logged
        self._program = [(op, self._handler(op, position)) for position, op in enumerate(self.stream)]
        self._reads = {op: schedule.reads(op) for op in self.stream if schedule.reads(op)}  # op -> message it waits for
        # the step's loss comes on the gradient messages the schedule marks (``2SG3*``); a
        # schedule without marks (and more than one rank) leaves it to an all-reduce on every rank
        self._stats_by_message = schedule.num_ranks == 1 or any(
            getattr(part, "loss", False) for stream in schedule.streams for op in stream for part in ins.parts(op))

    def stage_rank(self, stage: int) -> int:
        """Global rank running model stage ``stage`` in this rank's pipeline (the placement's)."""
        return self.pipe_peers[self.schedule.rank_of(stage)]

    def run(self, state: StepState, hooks: StepHooks, trace: bool = False,
            before: Callable[[Any], None] | None = None) -> StepState:
        """Run the stream once. ``before(op)``, when given, is called ahead of each instruction:
        the supported seam for fault injection and debugging (an error it raises is the step's)."""
        for position, (op, handler) in enumerate(self._program):
            try:
                if before is not None:
                    before(op)
                if trace:
                    start = time.perf_counter()
                    handler(op, state, hooks)
                    state.events.append((str(op), start, time.perf_counter()))
                else:
                    handler(op, state, hooks)
            except PeerLostError:
                raise
            except (dist.DistError, RuntimeError) as error:
                if not is_transport_failure(error):
                    raise
                raise PeerLostError(self._lost_peer_message(position, op, error, hooks)) from error
        left = state.leftovers()
        assert not left, f"rank {self.pipe_rank}: the step left {left} behind"
        return state

    def _stats(self, state: StepState) -> torch.Tensor | None:
        """This rank's copy of the loss statistics; None on every rank when the schedule sends
        them on no message (an all-reduce then)."""
        return state.loss.statistics() if self._stats_by_message else None

    def _handler(self, op: Any, position: int) -> Callable[[Any, StepState, StepHooks], None]:
        """``op``'s handler; an instruction without one is refused when the executor is built."""
        name = self.HANDLERS.get(type(op))
        if name is None:
            raise TypeError(f"rank {self.pipe_rank}: no handler for instruction {op!r} "
                            f"(type {type(op).__name__}) at position {position}")
        return getattr(self, name)

    def _peer_names(self, op: Any, hooks: StepHooks) -> str:
        """Who ``op`` talks to: its transfers' peers, the sender of what it reads, or a collective's."""
        if isinstance(op, _RANK_OPS):
            return f"one of ranks {[r for r in hooks.collective_peers(op) if r != self.rank]}"
        stages = {part.peer_stage for part in ins.parts(op) if hasattr(part, "peer_stage")}
        message = self.schedule.reads(op)
        if message is not None:
            stages.add(message[1] - 1 if message[0] == "activation" else message[1] + 1)
        peers = {self.stage_rank(stage): stage for stage in sorted(stages)}
        if len(peers) == 1:
            (rank, stage), = peers.items()
            return f"rank {rank} (stage {stage})"
        return f"one of ranks {sorted(peers)}"

    def _lost_peer_message(self, position: int, op: Any, error: BaseException, hooks: StepHooks) -> str:
        return self._lost(self._peer_names(op, hooks), f"during instruction {op} at position {position} of its "
                          "stream", error)

    def lost_while_draining(self, error: BaseException) -> str:
        """The PeerLostError message for a send of this step that failed after the stream ran."""
        peers = sorted({self.stage_rank(part.peer_stage) for op in self.stream for part in ins.parts(op)
                        if hasattr(part, "peer_stage")} - {self.rank})
        return self._lost(f"one of its pipeline neighbours, ranks {peers},", "while this step's sends drained",
                          error)

    def _lost(self, peer: str, when: str, error: BaseException) -> str:
        return lost_peer_message(self.rank, self.pipe_rank, peer, when, error)

    # --- data --------------------------------------------------------------
    def _batch(self, micro_batch: int, state: StepState, hooks: StepHooks) -> tuple[Any, Any]:
        if micro_batch not in state.batches:
            try:
                batch = next(state.data_iter)  # type: ignore[arg-type]
            except StopIteration:
                raise RuntimeError(
                    f"data_iter ran out after {len(state.batches)} of {self.schedule.micro_batches} "
                    f"micro-batches on pipe rank {self.pipe_rank}; each train_batch/eval_batch call reads "
                    f"schedule.micro_batches={self.schedule.micro_batches} (inputs, labels) pairs") from None
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"data_iter must yield (inputs, labels) pairs, got {type(batch).__name__}"
                                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            state.batches[micro_batch] = hooks.to_device(batch)
        return state.batches[micro_batch]

    def _load(self, op: ins.LoadMicroBatch, state: StepState, hooks: StepHooks) -> None:
        inputs, _ = self._batch(op.micro_batch, state, hooks)
        if op.stage == 0:
            state.slot(0, op.micro_batch).input = as_message(inputs, "data_iter inputs")

    # --- compute -----------------------------------------------------------
    def _read_received(self, op: Any, state: StepState) -> None:
        """Wait for (and unpack) the posted message ``op`` reads, the first time any op reads it."""
        message = self._reads.get(op)
        if message is not None and message in state.pending:
            receive, handle = state.pending.pop(message)
            self._store_received(receive, handle.wait(), state)

    def _forward(self, op: ins.Forward, state: StepState, hooks: StepHooks) -> None:
        self._read_received(op, state)
        slot = state.slot(op.stage, op.micro_batch)
        if slot.input is None:  # the previous stage ran on this rank: hand over locally
            previous = state.slot(op.stage - 1, op.micro_batch)
            tensors, was_tuple = as_message(previous.output, f"stage {op.stage - 1}")
            if not state.training:
                previous.output = None
            slot.input = (tuple(_as_grad_leaf(t) for t in tensors) if state.training else tensors, was_tuple)
        tensors, was_tuple = slot.input
        if not state.training:
            slot.input = None  # nothing flows back in inference: free at once
        output = self.module(from_message(tensors, was_tuple), stage=op.stage)
        if op.stage == self.last_stage:
            output = self._loss(op.micro_batch, output, state, hooks)
            if not state.training:
                return  # the loss is recorded; nothing is sent on
        slot.output = output

    def _loss(self, micro_batch: int, output: Any, state: StepState, hooks: StepHooks) -> torch.Tensor:
        _, labels = self._batch(micro_batch, state, hooks)
        if self.module.loss_fn is None:
            raise RuntimeError("the last stage needs a loss_fn: pass loss_fn=... to PipelineModule")
        if state.keep_outputs:
            state.results[micro_batch] = output.detach() if isinstance(output, torch.Tensor) else output
        loss = self.module.loss_fn(output, labels)
        state.loss.record(micro_batch, loss)
        # gradients of the mean over the micro-batches, as gradient accumulation gives
        return loss / self.schedule.micro_batches

    def _backward(self, op: Any, state: StepState, hooks: StepHooks) -> None:
        """Backward (B), or its input-gradient half (I) whose weight half waits for W."""
        self._read_received(op, state)
        slot = state.slot(op.stage, op.micro_batch)
        output, slot.output = slot.output, None
        if op.stage == self.last_stage:
            tensors, grads = [hooks.scaled_loss(output)], [None]
        else:
            received, slot.output_grad = slot.output_grad, None  # one gradient per float output, in order
            outs, _ = as_message(output, f"stage {op.stage}")
            floats = [t for t in outs if t.is_floating_point() or t.is_complex()]
            pairs = [(t, g) for t, g in zip(floats, received) if t.requires_grad]
            tensors, grads = [t for t, _ in pairs], [g for _, g in pairs]
        (inputs, _), slot.input = slot.input, None
        if isinstance(op, ins.BackwardInput):
            leaves = [t for t in inputs if t.requires_grad]
            params = [p for p in self.module.stage_module(op.stage).parameters() if p.requires_grad]
            _, slot.weight_grad = backward_input(tensors, grads, leaves, params)
            self._say_early(op.stage, slot.weight_grad.early_reasons)
        elif tensors:
            torch.autograd.backward(tensors, grads)
        if not isinstance(op, ins.BackwardInput):  # (a split backward's W has the parameter gradients)
            hooks.weight_grads_done()
        if op.stage > 0:
            grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                          for t in inputs if t.is_floating_point() or t.is_complex())
            if self.schedule.rank_of(op.stage - 1) == self.pipe_rank:
                state.slot(op.stage - 1, op.micro_batch).output_grad = grads
            else:
                slot.input_grad = grads

    def _say_early(self, stage: int, reasons: list[str]) -> None:
        """Once per model stage: which weight gradients a split backward could not defer to W, and why."""
        if reasons and stage not in self._said_early:
            self._said_early.add(stage)
            logging.getLogger("pipegrid").warning(
                f"split backward: rank {self.rank} model stage {stage} computes some weight gradients with the "
                f"input gradients (I), not in W: {'; '.join(reasons)}")

    def _backward_weight(self, op: ins.BackwardWeight, state: StepState, hooks: StepHooks) -> None:
        """The deferred weight-gradient half of a split backward (zero-bubble's W)."""
        # (ZeRO-3 per layer: each W call's layers gathered again, the next call's posted)
        backward_weight(state.take(op.stage, op.micro_batch, "weight_grad"), hooks.parameters_needed)
        hooks.weight_grads_done()

    # --- communication -----------------------------------------------------
    # With schedule.coalesce > 1 a message carries a group of micro-batches: the group's
    # last send posts it, its first receive takes it, the others only mark their place.
    def _group(self, op: Any) -> range:
        return self.schedule.message_group(op.micro_batch)

    def _send_payload(self, op: Any, state: StepState,
                      hooks: StepHooks) -> tuple[str, int, tuple[torch.Tensor, ...], bool]:
        """(kind, stage, tensors, was_tuple) of the group's message, taken out of ``state``."""
        tensors: tuple[torch.Tensor, ...] = ()
        was_tuple = True
        for micro_batch in self._group(op):
            if isinstance(op, ins.SendGrad):
                tensors += state.take(op.stage, micro_batch, "input_grad")
                if micro_batch == op.micro_batch and op.loss:
                    stats = self._stats(state)
                    if stats is None:
                        raise RuntimeError(f"rank {self.pipe_rank}: no loss statistics to pass on with {op}, which "
                                           "the schedule marks to carry them (a pipegrid bug: validate checks that "
                                           "a rank sends them only after it has them)")
                    tensors += (stats.to(hooks.device),)
                continue
            slot = state.slot(op.stage, micro_batch)
            output = slot.output  # kept for backward in training, freed once sent in inference
            if not state.training:
                slot.output = None
            part, was_tuple = as_message(output, f"stage {op.stage}")
            tensors += part
        return ("grad" if isinstance(op, ins.SendGrad) else "act"), op.stage, tensors, was_tuple

    def _reduce_tied_grads(self, op: ins.ReduceTiedGrads, state: StepState, hooks: StepHooks) -> None:
        hooks.reduce_tied_grads()

    def _reduce_grads(self, op: ins.ReduceGrads, state: StepState, hooks: StepHooks) -> None:
        hooks.reduce_data_parallel_grads()

    def _optimizer_step(self, op: ins.OptimizerStep, state: StepState, hooks: StepHooks) -> None:
        state.loss.mean = hooks.optimizer_step(state.loss, self._stats(state))

    def _transfer(self, op: Any, state: StepState, hooks: StepHooks) -> None:
        """Post a send, a receive or an Exchange group as one group; receives are read later.

        A receive that must first learn its message's shape (a stage's first activation, or
        every one with dynamic shapes) waits for the header its sender posts with the send,
        so the group's members before it (earlier in the schedule's one transfer order) go
        first, as a group of their own: its sender may need them before it can send.
        """
        sends: list[Outgoing] = []
        receives: list[tuple[Any, Incoming]] = []
        for part in ins.parts(op):
            if not self.schedule.transfers(part):
                continue
            if ins.is_send(part):
                sends.append(self._outgoing(part, state, hooks))
                continue
            incoming = self._incoming(part, state, hooks)
            if (sends or receives) and self.p2p.needs_header(incoming):
                self._post(sends, receives, state)
                sends, receives = [], []
            receives.append((part, incoming))
        self._post(sends, receives, state)

    def _post(self, sends: list[Outgoing], receives: list[tuple[Any, Incoming]], state: StepState) -> None:
        handles = self.p2p.post(sends, [incoming for _, incoming in receives])
        for (receive, _), handle in zip(receives, handles):
            state.pending[self.schedule.message_key(receive)] = (receive, handle)

    def _outgoing(self, op: Any, state: StepState, hooks: StepHooks) -> Outgoing:
        kind, stage, tensors, was_tuple = self._send_payload(op, state, hooks)
        return Outgoing(kind, stage, tensors, was_tuple, self.stage_rank(op.peer_stage))

    def _incoming(self, op: Any, state: StepState, hooks: StepHooks) -> Incoming:
        src = self.stage_rank(op.peer_stage)
        if isinstance(op, ins.RecvGrad):
            return Incoming("grad", op.stage, src, self._grad_template(op, state, hooks))
        return Incoming("act", op.peer_stage, src)

    def _own_activation(self, op: ins.RecvGrad, state: StepState) -> tuple[torch.Tensor, ...]:
        """The group's local activations, whose float tensors the received gradients match."""
        return tuple(t for micro_batch in self._group(op)
                     for t in as_message(state.slot(op.stage, micro_batch).output, f"stage {op.stage}")[0])

    def _grad_template(self, op: ins.RecvGrad, state: StepState, hooks: StepHooks) -> tuple[torch.Tensor, ...]:
        """What the gradient message matches: the group's activations (+ the loss statistics)."""
        activation = self._own_activation(op, state)
        if op.loss:
            activation += (torch.empty(2, dtype=torch.float64, device=hooks.device),)
        return activation

    def _split(self, op: Any, tensors: tuple[torch.Tensor, ...]) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
        """A group's message back into (micro-batch, its tensors), in group order."""
        group = self._group(op)
        per = len(tensors) // len(group)
        return [(mb, tensors[n * per:(n + 1) * per]) for n, mb in enumerate(group)]

    def _store_received(self, op: Any, received: tuple[tuple[torch.Tensor, ...], bool], state: StepState) -> None:
        tensors, was_tuple = received
        if isinstance(op, ins.RecvGrad) and op.loss:
            tensors, state.loss.received = tensors[:-1], tensors[-1].cpu()
        for micro_batch, part in self._split(op, tensors):
            slot = state.slot(op.stage, micro_batch)
            if isinstance(op, ins.RecvGrad):
                slot.output_grad = part
                continue
            if state.training:
                part = tuple(_as_grad_leaf(t) for t in part)
            slot.input = (part, was_tuple)
