"""``Schedule``: every rank's full instruction stream for one training (or inference) step.

It is the single source of truth: the engine executes ``streams[rank]`` as is, and
``validate``/``simulate`` check the very same tuples.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipegrid.schedules.instructions import (
    Backward, BackwardInput, Forward, Instruction, RecvToken, is_send, message_of,
)
from pipegrid.schedules.placement import Placement

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """What every pipeline rank runs, in order, for one step."""

    name: str
    """Schedule name as given to ``build`` (``gpipe``, ``1f1b``, ...)."""
    placement: Placement
    """Which rank runs each model stage (``loop`` or ``v``), with p ranks of v chunks each."""
    micro_batches: int
    """Micro-batches m per step."""
    streams: tuple[tuple[Instruction, ...], ...]
    """``streams[rank]``: that rank's program, communication and reduce/step included."""
    training: bool = True
    """False for forward-only schedules (no backward, reduce or optimizer step)."""
    split_backward: bool = False
    """True when a backward may be split into BackwardInput + BackwardWeight (each
    (stage, micro-batch) then runs either a full Backward or both halves)."""
    coalesce: int = 1
    """Micro-batches per message: each group of this many consecutive micro-batches is
    computed one by one but crosses between stages as one message (the schedule is built
    over the groups). Fewer, larger messages for a longer fill and drain."""
    feedback: int = 0
    """Generation (``generate.build``): the last stage's output of item w, a sampled token,
    is stage 0's input of item ``w + feedback`` (the next token of the same micro-batch);
    ``micro_batches`` then counts items, ``feedback`` per decode step. 0: no feedback."""
    early_receives: bool = False
    """Whether each receive is posted as early as the one transfer order allows (just after the
    rank's transfer before it in that order, once the rank holds what sizes it), not just before
    its reader: gloo then finds the receive waiting when the send comes and writes at once,
    instead of a round trip through the sender's progress thread (``fusion.order_transfers``)."""

    def message_group(self, micro_batch: int) -> range:
        """The micro-batches whose tensors travel in one message with ``micro_batch``'s."""
        first = micro_batch - micro_batch % self.coalesce
        return range(first, first + self.coalesce)

    def transfers(self, op: Instruction) -> bool:
        """Whether a send or receive moves its group's message.

        A group's last send posts the message and its first receive takes it; the
        other sends and receives of the group only mark their micro-batch's place.
        """
        k = self.coalesce
        if k == 1:
            return True
        offset = op.micro_batch % k  # type: ignore[union-attr]
        return offset == (k - 1 if is_send(op) else 0)

    def message_key(self, op: Instruction) -> tuple[str, int, int]:
        """``message_of(op)`` for the whole group: named by the group's first micro-batch."""
        kind, stage, micro_batch = message_of(op)
        return kind, stage, micro_batch - micro_batch % self.coalesce

    def reads(self, op: Instruction) -> tuple[str, int, int] | None:
        """The received message (``message_key``) compute ``op`` reads, if any.

        A receive is posted where it stands; its rank waits for the data only here, at
        the first op that reads it (the forward of its input, the backward of its
        output's gradient), so a receive posted early never holds compute up.
        """
        if isinstance(op, Forward) and op.stage == 0:
            source = self.fed_by(op.micro_batch)
            last = self.num_model_stages - 1
            if source is None or self.placement.same_rank(0, last):
                return None
            return ("token", last, source)
        if isinstance(op, Forward):
            kind, remote = "activation", self.placement.remote_before(op.stage)
        elif isinstance(op, (Backward, BackwardInput)):
            kind, remote = "grad", self.placement.remote_after(op.stage)
        else:
            return None
        return (kind, op.stage, op.micro_batch - op.micro_batch % self.coalesce) if remote else None

    def fed_by(self, item: int) -> int | None:
        """Generation: the item whose sampled token stage 0's item ``item`` reads, if any."""
        if self.feedback and item >= self.feedback:
            return item - self.feedback
        return None

    def home_stage(self, op: Instruction) -> int:
        """The model stage whose rank runs ``op``: stage 0 for a RecvToken (named by its sender)."""
        return 0 if isinstance(op, RecvToken) else op.stage  # type: ignore[union-attr]

    @property
    def num_ranks(self) -> int:
        """Pipeline degree p: the number of pipe ranks (one stream each)."""
        return self.placement.num_ranks

    @property
    def virtual_stages(self) -> int:
        """Model chunks v per rank."""
        return self.placement.chunks

    @property
    def num_model_stages(self) -> int:
        """p * v: the number of model stages (chunks) the model is cut into."""
        return self.placement.num_stages

    def rank_of(self, stage: int) -> int:
        """Pipe rank that runs model stage ``stage`` (``placement.rank_of``)."""
        return self.placement.rank_of(stage)

    def stages_of(self, rank: int) -> list[int]:
        """Model stages that pipe rank ``rank`` runs, first chunk first."""
        return self.placement.stages_of(rank)

    @property
    def loss_rank(self) -> int:
        """The rank of the last model stage, which computes every micro-batch's loss."""
        return self.rank_of(self.num_model_stages - 1)

    def table(self) -> str:
        """Every rank's stream as one row, instruction positions as columns."""
        cells = [[str(op) for op in stream] for stream in self.streams]
        length = max((len(row) for row in cells), default=0)
        width = max([len(str(length))] + [len(c) for row in cells for c in row])
        label = max(len(f"rank {len(cells) - 1}"), 4)
        header = " " * label + " | " + " ".join(f"{i:>{width}}" for i in range(length))
        lines = [
            f"{self.name}: ranks={self.num_ranks} micro_batches={self.micro_batches} "
            f"virtual_stages={self.virtual_stages}"
            + (f" placement={self.placement.kind}" if self.placement.kind != "loop" else "")
            + (f" coalesce={self.coalesce}" if self.coalesce > 1 else "")
            + (f" feedback={self.feedback}" if self.feedback else ""),
            header,
        ]
        for rank, row in enumerate(cells):
            body = " ".join(f"{c:>{width}}" for c in row)
            lines.append(f"{f'rank {rank}':<{label}} | {body}")
        return "\n".join(lines)
