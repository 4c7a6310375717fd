"""``engine.generate`` on one pipe rank: the generate schedule's stream run with each stage's
KV cache (``kv_cache.py``), tokens chosen on the last stage (``sampling.py``) and fed back.

A micro-batch's message between stages is ``(hidden, positions, attention_mask, rows)``:
the new tokens' hidden states, where they stand, the padding mask of everything so far and
which sequences of the batch they are. Sequences that finished (EOS) leave ``rows``: stage 0
drops them when their last token comes back, and every later stage drops their cached rows
when it sees the smaller ``rows``, so they stop costing compute; a micro-batch with no rows
left runs no layers at all and sends empty messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipegrid.pipe.kv_cache import DecodeStep, LayerCaches, StageCache
from pipegrid.pipe.p2p import Incoming, Outgoing, P2P, Received
from pipegrid.pipe.generate_request import GenerateRequest
from pipegrid.schedules import instructions as ins
from pipegrid.schedules.schedule import Schedule

__all__ = ["Generation"]


@dataclass
class _MicroBatch:
    """What this rank keeps of one micro-batch between its items."""

    rows: torch.Tensor
    cache: StageCache
    mask: torch.Tensor | None = None  # stage 0: the padding mask of everything fed so far
    positions: torch.Tensor | None = None  # stage 0: the last fed token's position per row
    output: Any = None  # this item's output, until sent or fed back


class Generation:
    """Runs one generate schedule on this pipe rank; the last rank holds the sequences."""

    def __init__(self, schedule: Schedule, pipe_rank: int, module: Any, p2p: P2P, peers: list[int],
                 request: GenerateRequest, device: torch.device) -> None:
        self.schedule, self.pipe_rank, self.module, self.p2p = schedule, pipe_rank, module, p2p
        self.peers, self.request, self.device = peers, request, device
        self.stage = schedule.stages_of(pipe_rank)[0]
        self.last = schedule.num_model_stages - 1
        self.m = schedule.feedback or request.micro_batches
        new_cache = getattr(module, "new_generation_cache", None)
        self.micro = [_MicroBatch(rows, new_cache(self.stage) if new_cache else LayerCaches())
                      for rows in request.batch_rows]
        self.received: dict[tuple[str, int, int], Received] = {}  # message -> its posted receive
        self.tokens: dict[int, torch.Tensor] = {}  # one rank only: item -> its sampled tokens
        batch = request.input_ids.shape[0]
        self.generated = torch.full((batch, request.max_new_tokens), request.pad_token_id, dtype=torch.int64)
        self.steps_used = 0
        if self.stage == self.last:
            self.generators = request.sampling.generators(batch, request.seed)

    def run(self) -> None:
        """Every instruction of this rank's stream in order; a LoadMicroBatch reads nothing (the
        prompts are at hand), sends and receives are posted where they stand."""
        for op in self.schedule.streams[self.pipe_rank]:
            if isinstance(op, ins.Forward):
                self._forward(op)
            elif isinstance(op, ins.Exchange) or ins.is_send(op) or ins.is_recv(op):
                self._transfer(op)
            elif not isinstance(op, ins.LoadMicroBatch):
                raise TypeError(f"generate cannot run {op} ({type(op).__name__}); its schedule holds forwards, "
                                "loads, sends and receives only")
        self.p2p.wait_all()

    def cache_bytes(self) -> int:
        """Bytes this rank's stage caches hold now, over every micro-batch."""
        return sum(mb.cache.nbytes() for mb in self.micro)

    # --- compute -------------------------------------------------------------------
    def _forward(self, op: ins.Forward) -> None:
        mb = self.micro[op.micro_batch % self.m]
        step_index = op.micro_batch // self.m
        if self.stage == 0:
            hidden, step = self._first_input(mb, op.micro_batch, step_index)
        else:
            hidden, positions, mask, rows = self._take(("activation", self.stage, op.micro_batch))
            self._keep_rows(mb, rows)
            step = DecodeStep(positions, mask)
        with torch.no_grad():
            out = self.module.stage_module(self.stage).forward_cached(hidden, mb.cache, step) \
                if mb.rows.numel() else hidden
        if self.stage == self.last:
            mb.output = self._choose(out, mb.rows, step_index)
            if self.stage == 0:  # one rank holds every stage: the tokens stay in memory
                self.tokens[op.micro_batch] = mb.output
        else:
            mb.output = (out, step.positions, step.attention_mask, mb.rows.to(self.device))

    def _first_input(self, mb: _MicroBatch, item: int, step_index: int) -> tuple[torch.Tensor, DecodeStep]:
        """Stage 0's input: the prompt at step 0, else each live sequence's last token."""
        if step_index == 0:
            ids = self.request.input_ids[mb.rows].to(self.device)
            mb.mask = self.request.attention_mask[mb.rows].to(self.device)
            positions = (mb.mask.cumsum(-1) - 1).masked_fill(mb.mask == 0, 0)
        else:
            tokens = self._fed_tokens(item - self.m)
            live = ~_is_eos(tokens, self.request.eos_token_ids)
            self._keep_rows(mb, mb.rows[live.cpu()])
            ids = tokens[live].unsqueeze(1)
            mb.mask = torch.cat([mb.mask[live], torch.ones_like(ids)], dim=1)
            positions = mb.positions[live] + 1
        mb.positions = positions[:, -1:]
        return ids, DecodeStep(positions, mb.mask)

    def _fed_tokens(self, source: int) -> torch.Tensor:
        if self.stage == self.last:  # first and last stage on this rank: handed over in memory
            return self.tokens.pop(source)
        return self._take(("token", self.last, source))[0]

    def _choose(self, logits: Any, rows: torch.Tensor, step_index: int) -> torch.Tensor:
        """The last stage: each live sequence's next token, written into the output."""
        if rows.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        tokens = self.request.sampling.next_tokens(logits[:, -1, :], rows, self.generators)
        self.generated[rows, step_index] = tokens.cpu()
        self.steps_used = max(self.steps_used, step_index + 1)
        return tokens

    def _keep_rows(self, mb: _MicroBatch, rows: torch.Tensor) -> None:
        """Drop the cached rows of sequences that finished since this stage last saw them."""
        rows = rows.cpu()
        if rows.numel() != mb.rows.numel():
            mb.cache.select_rows(torch.searchsorted(mb.rows, rows).to(self.device))
            mb.rows = rows

    # --- transfers -----------------------------------------------------------------
    def _take(self, key: tuple[str, int, int]) -> tuple[torch.Tensor, ...]:
        tensors, _ = self.received.pop(key).wait()
        return tensors

    def _transfer(self, op: Any) -> None:
        """Post a send, a receive or an Exchange as one group. Every receive here first waits
        for its header (shapes change every step), so the members before it go first as a
        group of their own: its sender may need them before it can send (as the executor does)."""
        sends: list[Outgoing] = []
        receives: list[tuple[tuple[str, int, int], Incoming]] = []
        for part in ins.parts(op):
            peer = self.peers[self.schedule.rank_of(part.peer_stage)]
            if ins.is_send(part):
                mb = self.micro[part.micro_batch % self.m]
                payload = mb.output if isinstance(mb.output, tuple) else (mb.output,)
                sends.append(Outgoing("act", part.stage, payload, True, peer))
                continue
            if sends or receives:
                self._post(sends, receives)
                sends, receives = [], []
            receives.append((ins.message_of(part), Incoming("act", part.peer_stage, peer)))
        self._post(sends, receives)

    def _post(self, sends: list[Outgoing], receives: list[tuple[tuple[str, int, int], Incoming]]) -> None:
        handles = self.p2p.post(sends, [incoming for _, incoming in receives])
        for (key, _), handle in zip(receives, handles):
            self.received[key] = handle


def _is_eos(tokens: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    if not eos:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(eos, device=tokens.device))


def run_generation(schedule: Schedule, pipe_rank: int, module: Any, p2p: P2P, peers: list[int],
                   request: GenerateRequest, device: torch.device, pipe_group: Any) -> tuple[torch.Tensor, int]:
    """Run the schedule on this rank; (sequences, this rank's cache bytes), the sequences on
    every rank: the last pipe rank, which chose every token, broadcasts them."""
    generation = Generation(schedule, pipe_rank, module, p2p, peers, request, device)
    generation.run()
    generated = torch.cat([generation.generated, torch.tensor([[generation.steps_used]] * len(generation.generated))],
                          dim=1).to(device)
    if schedule.num_ranks > 1:
        torch.distributed.broadcast(generated, src=peers[schedule.num_ranks - 1], group=pipe_group)
    generated = generated.cpu()
    used = int(generated[0, -1]) if len(generated) else 0
    sequences = torch.cat([request.input_ids, generated[:, :used]], dim=1)
    return sequences, generation.cache_bytes()
