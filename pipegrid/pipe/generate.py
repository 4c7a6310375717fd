"""``engine.generate`` on one pipe rank: the generate schedule's stream run with each model
stage's KV cache (``kv_cache.py``), tokens chosen on the last stage (``sampling.py``) and fed back.

Messages between model stages (the ``StageBatch`` of each side tracks the rest itself):

- prefill: ``(hidden, positions, attention_mask, rows)``, shapes in a header (they are new);
- decode: ``(hidden, live)`` sized by what both sides know, so no header: ``live`` (S,) says
  which of the S rows the stage had before this item still run (sequences that hit EOS leave
  every stage's cache), ``hidden`` (S, 1, ...) holds theirs first; it shrinks one item later;
- token (last stage -> stage 0): the (n,) chosen tokens of the n rows stage 0 sent.

A micro-batch whose rows all finished sends one decode message with no row live through the
stages (it runs no layers); each stage notes the item it left at and skips every later
instruction of that micro-batch, sends and receives alike, so both ends of every message
agree; the run ends when every micro-batch has left (or ran its last step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipegrid.pipe.generate_request import GenerateRequest
from pipegrid.pipe.kv_cache import DecodeStep, LayerCaches, StageCache
from pipegrid.pipe.p2p import P2P, Incoming, MessageMeta, Outgoing, Received
from pipegrid.schedules import generate as generate_schedule
from pipegrid.schedules import instructions as ins
from pipegrid.schedules.schedule import Schedule
from pipegrid.tensor.sequence import SequenceParallel

__all__ = ["Generation", "GenerationReport", "run_generation"]

_KNOWN = "sized"  # P2P message kind whose shape both ends know: no header travels


@dataclass
class _StageBatch:
    """What one model stage keeps of one micro-batch between its items."""

    rows: torch.Tensor
    """The batch rows (sequences) still running at this stage, on the CPU."""
    cache: StageCache
    mask: torch.Tensor | None = None  # (B, past) padding mask of everything fed so far
    positions: torch.Tensor | None = None  # (B, 1) the last fed token's position
    received: tuple[tuple[int, ...], torch.dtype] | None = None  # trailing shape, dtype of the hidden states in
    sent: tuple[tuple[int, ...], torch.dtype] | None = None  # ... and out: the decode messages' sizes
    left_at: int | None = None  # the item at which no row was left: every later one is skipped

    def start(self, positions: torch.Tensor, mask: torch.Tensor) -> DecodeStep:
        """The prefill: the prompt's positions and padding mask."""
        self.mask, self.positions = mask, positions[:, -1:]
        return DecodeStep(positions, mask)

    def advance(self, live: torch.Tensor) -> DecodeStep:
        """A decode step: keep the ``live`` rows (cache included), one more real token each."""
        assert self.mask is not None and self.positions is not None
        if not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            self.rows = self.rows[keep.cpu()]
            self.cache.select_rows(keep)
            self.mask, self.positions = self.mask[keep], self.positions[keep]
        self.mask = torch.cat([self.mask, torch.ones_like(self.positions)], dim=1)
        self.positions = self.positions + 1
        return DecodeStep(self.positions, self.mask)


@dataclass
class GenerationReport:
    """What one rank's generation did: its cache and the work the schedule did not need."""

    cache_bytes: int = 0
    """Bytes of KV cache this rank's stages held at the end."""
    forwards_run: int = 0
    """Forward instructions that ran layers (a micro-batch with live rows)."""
    forwards_scheduled: int = 0
    """Forward instructions in this rank's stream (every micro-batch, every step)."""
    instructions_skipped: int = 0
    """Instructions (transfers counted per part) skipped because their micro-batch had left."""
    forwards_by_step: dict[int, int] = field(default_factory=dict)
    """Step (0: the prefill) -> forwards this rank ran in it."""


class Generation:
    """Runs one generate schedule on this pipe rank; the last stage holds the sequences."""

    def __init__(self, schedule: Schedule, pipe_rank: int, module: Any, p2p: P2P, peers: list[int],
                 request: GenerateRequest, device: torch.device, vocab_group: Any = None) -> None:
        self.schedule, self.pipe_rank, self.module, self.p2p = schedule, pipe_rank, module, p2p
        self.peers, self.request, self.device, self.vocab_group = peers, request, device, vocab_group
        self.last = schedule.num_model_stages - 1
        self.m = schedule.feedback or request.micro_batches
        new_cache = getattr(module, "new_generation_cache", None)
        self.state = {stage: [_StageBatch(rows, new_cache(stage) if new_cache else LayerCaches())
                              for rows in request.batch_rows] for stage in schedule.stages_of(pipe_rank)}
        self.outputs: dict[tuple[int, int], Any] = {}  # (stage, item) -> its message, until sent or handed on
        self.received: dict[tuple[str, int, int], Received] = {}  # message -> its posted receive
        batch = request.input_ids.shape[0]
        self.generated = torch.full((batch, request.max_new_tokens), request.pad_token_id, dtype=torch.int64)
        self.steps_used = 0
        self.report = GenerationReport()
        if self.last in self.state:
            self.generators = request.sampling.generators(batch, request.seed)

    def run(self) -> GenerationReport:
        """Every instruction of this rank's stream in order, less those of micro-batches that
        left; a LoadMicroBatch reads nothing (the prompts are at hand)."""
        for op in self.schedule.streams[self.pipe_rank]:
            if isinstance(op, ins.Forward):
                self.report.forwards_scheduled += 1
                if self._left(op):
                    self.report.instructions_skipped += 1
                else:
                    self._forward(op)
            elif isinstance(op, ins.Exchange) or ins.is_send(op) or ins.is_recv(op):
                self._transfer(op)
            elif not isinstance(op, ins.LoadMicroBatch):
                raise TypeError(f"generate cannot run {op} ({type(op).__name__}); its schedule holds forwards, "
                                "loads, sends and receives only")
        self.p2p.wait_all()
        self.report.cache_bytes = sum(b.cache.nbytes() for batches in self.state.values() for b in batches)
        return self.report

    def _left(self, op: Any) -> bool:
        """Whether ``op`` is skipped: its micro-batch left before it, as its home stage saw."""
        stage = 0 if isinstance(op, ins.RecvToken) else self.last if isinstance(op, ins.SendToken) else op.stage
        return generate_schedule.skipped(op, self.state[stage][op.micro_batch % self.m].left_at)

    # --- compute -------------------------------------------------------------------
    def _forward(self, op: ins.Forward) -> None:
        stage, item = op.stage, op.micro_batch
        batch = self.state[stage][item % self.m]
        before = batch.rows.numel()
        if stage == 0:
            x, step, live = self._first_input(batch, item)
        else:
            x, step, live = self._stage_input(batch, stage, item)
        out = None
        if batch.rows.numel():
            with torch.no_grad():
                out = self.module.stage_module(stage).forward_cached(x, batch.cache, step)
            self.report.forwards_run += 1
            steps = self.report.forwards_by_step
            steps[item // self.m] = steps.get(item // self.m, 0) + 1
        else:
            batch.left_at = item
        if stage == self.last:
            self.outputs[(stage, item)] = self._choose(out, batch.rows, item // self.m)
        elif live is None:  # the prefill: shapes are new, the header says them
            batch.sent = (tuple(out.shape[2:]), out.dtype)
            self.outputs[(stage, item)] = (out, step.positions, step.attention_mask, batch.rows.to(self.device))
        else:
            self.outputs[(stage, item)] = (self._padded(out, before, batch), live)

    def _first_input(self, batch: _StageBatch, item: int) -> tuple[torch.Tensor, DecodeStep, torch.Tensor | None]:
        """Stage 0's input: the prompt at the prefill, else each live sequence's last token."""
        if item < self.m:
            ids = self.request.input_ids[batch.rows].to(self.device)
            mask = self.request.attention_mask[batch.rows].to(self.device)
            return ids, batch.start((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), mask), None
        tokens = self._fed_tokens(item - self.m)
        live = ~_is_eos(tokens, self.request.eos_token_ids)
        return tokens[live].unsqueeze(1), batch.advance(live), live

    def _stage_input(self, batch: _StageBatch, stage: int,
                     item: int) -> tuple[torch.Tensor, DecodeStep, torch.Tensor | None]:
        """A later stage's input, from the previous stage's message (or its output on this rank)."""
        message = self._incoming(("activation", stage, item), stage - 1, item)
        if item < self.m:
            hidden, positions, mask, rows = message
            batch.rows, batch.received = rows.cpu(), (tuple(hidden.shape[2:]), hidden.dtype)
            return hidden, batch.start(positions, mask), None
        hidden, live = message
        live = live.bool()
        step = batch.advance(live)
        return hidden[:batch.rows.numel()], step, live

    def _padded(self, out: torch.Tensor | None, rows: int, batch: _StageBatch) -> torch.Tensor:
        """The live rows' hidden states first, in the message size both ends know (``rows``)."""
        assert batch.sent is not None
        shape, dtype = batch.sent
        live = 0 if out is None else out.shape[0]
        if live == rows:
            return out  # type: ignore[return-value]
        pad = torch.zeros((rows - live, 1, *shape), dtype=dtype, device=self.device)
        return pad if out is None else torch.cat([out, pad])

    def _incoming(self, key: tuple[str, int, int], source_stage: int, item: int) -> tuple[torch.Tensor, ...]:
        if self.schedule.rank_of(source_stage) == self.pipe_rank:  # handed over in memory
            return self.outputs.pop((source_stage, item))
        tensors, _ = self.received.pop(key).wait()
        return tensors

    def _fed_tokens(self, source: int) -> torch.Tensor:
        message = self._incoming(("token", self.last, source), self.last, source)
        return message if isinstance(message, torch.Tensor) else message[0]

    def _choose(self, logits: Any, rows: torch.Tensor, step_index: int) -> torch.Tensor:
        """The last stage: each live sequence's next token, written into the output. Logits
        split over the vocabulary (tensor parallel) are gathered at the last position only,
        so every tensor rank draws the same tokens from the same generators."""
        if rows.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        last = logits[:, -1, :]
        if self.vocab_group is not None:
            shards = [torch.empty_like(last) for _ in range(dist.get_world_size(self.vocab_group))]
            dist.all_gather(shards, last.contiguous(), group=self.vocab_group)
            last = torch.cat(shards, dim=-1)
        tokens = self.request.sampling.next_tokens(last, rows, self.generators)
        self.generated[rows, step_index] = tokens.cpu()
        self.steps_used = max(self.steps_used, step_index + 1)
        return tokens

    # --- transfers -----------------------------------------------------------------
    def _transfer(self, op: Any) -> None:
        """Post a send, a receive or an Exchange as one group, less the parts of micro-batches
        that left. A receive that waits for its header (a prefill) goes after the members before
        it, as a group of their own: its sender may need them before it can send."""
        sends: list[Outgoing] = []
        receives: list[tuple[tuple[str, int, int], Incoming]] = []
        for part in ins.parts(op):
            if self._left(part):
                self.report.instructions_skipped += 1
                continue
            peer = self.peers[self.schedule.rank_of(part.peer_stage)]
            if ins.is_send(part):
                payload = self.outputs.pop((part.stage, part.micro_batch))
                payload = payload if isinstance(payload, tuple) else (payload,)
                kind = "act" if part.micro_batch < self.m and isinstance(part, ins.SendActivation) else _KNOWN
                sends.append(Outgoing(kind, part.stage, payload, True, peer))
                continue
            incoming = self._expected(part, peer)
            if incoming.kind == "act" and (sends or receives):
                self._post(sends, receives)
                sends, receives = [], []
            receives.append((ins.message_of(part), incoming))
        self._post(sends, receives)

    def _expected(self, part: Any, peer: int) -> Incoming:
        """What a receive gets: a prefill's shapes come in a header; a decode message's and a
        token's are known here (the rows this stage had, the rows stage 0 sent)."""
        item = part.micro_batch
        if isinstance(part, ins.RecvToken):
            rows = self.state[0][item % self.m].rows.numel()
            return Incoming(_KNOWN, part.stage, peer, meta=MessageMeta(((rows,),), (torch.int64,), True))
        if item < self.m:
            return Incoming("act", part.peer_stage, peer)
        batch = self.state[part.stage][item % self.m]
        assert batch.received is not None, "a decode message before its micro-batch's prefill"
        shape, dtype = batch.received
        rows = batch.rows.numel()
        meta = MessageMeta(((rows, 1, *shape), (rows,)), (dtype, torch.bool), True)
        return Incoming(_KNOWN, part.peer_stage, peer, meta=meta)

    def _post(self, sends: list[Outgoing], receives: list[tuple[tuple[str, int, int], Incoming]]) -> None:
        handles = self.p2p.post(sends, [incoming for _, incoming in receives])
        for (key, _), handle in zip(receives, handles):
            self.received[key] = handle


def _is_eos(tokens: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    if not eos:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(eos, device=tokens.device))


def _whole_sequences(module: Any) -> contextlib.AbstractContextManager:
    """A model with a sequence-parallel switch generates on whole sequences (decode steps have T = 1)."""
    switch = getattr(module, "sequence_parallel", None)
    return switch.off() if isinstance(switch, SequenceParallel) else contextlib.nullcontext()


def run_generation(schedule: Schedule, pipe_rank: int, module: Any, p2p: P2P, peers: list[int],
                   request: GenerateRequest, device: torch.device,
                   pipe_group: Any) -> tuple[torch.Tensor, GenerationReport]:
    """Run the schedule on this rank; (sequences, what this rank did), the sequences on every
    rank: the pipe rank of the last model stage, which chose every token, broadcasts them."""
    generation = Generation(schedule, pipe_rank, module, p2p, peers, request, device,
                            getattr(module, "vocab_parallel_group", None))
    with _whole_sequences(module):
        report = generation.run()
    steps = torch.tensor([[generation.steps_used]] * len(generation.generated))
    generated = torch.cat([generation.generated, steps], dim=1).to(device)
    if schedule.num_ranks > 1:
        source = peers[schedule.rank_of(schedule.num_model_stages - 1)]
        dist.broadcast(generated, src=source, group=pipe_group)
    generated = generated.cpu()
    used = int(generated[0, -1]) if len(generated) else 0
    sequences = torch.cat([request.input_ids, generated[:, :used]], dim=1)
    return sequences, report
