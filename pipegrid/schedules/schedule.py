"""``Schedule``: every rank's full instruction stream for one training (or inference) step.

It is the single source of truth: the engine executes ``streams[rank]`` as is, and
``validate``/``simulate`` check the very same tuples.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipegrid.schedules.instructions import (
    Backward, BackwardInput, Forward, Instruction, is_send, message_of,
)

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """What every pipeline rank runs, in order, for one step."""

    name: str
    """Schedule name as given to ``build`` (``gpipe``, ``1f1b``, ...)."""
    num_stages: int
    """Pipeline degree p: the number of pipe ranks."""
    micro_batches: int
    """Micro-batches m per step."""
    virtual_stages: int
    """Model chunks v per rank; model stage s runs on rank s % p."""
    streams: tuple[tuple[Instruction, ...], ...]
    """``streams[rank]``: that rank's program, communication and reduce/step included."""
    training: bool = True
    """False for forward-only schedules (no backward, reduce or optimizer step)."""
    split_backward: bool = False
    """True when backward is split into BackwardInput + BackwardWeight."""
    coalesce: int = 1
    """Micro-batches per message: each group of this many consecutive micro-batches is
    computed one by one but crosses between stages as one message (the schedule is built
    over the groups). Fewer, larger messages for a longer fill and drain."""

    def message_group(self, micro_batch: int) -> range:
        """The micro-batches whose tensors travel in one message with ``micro_batch``'s."""
        first = micro_batch - micro_batch % self.coalesce
        return range(first, first + self.coalesce)

    def transfers(self, op: Instruction) -> bool:
        """Whether a send or receive moves its group's message.

        A group's last send posts the message and its first receive takes it; the
        other sends and receives of the group only mark their micro-batch's place.
        """
        group = self.message_group(op.micro_batch)  # type: ignore[union-attr]
        return op.micro_batch == (group[-1] if is_send(op) else group[0])  # type: ignore[union-attr]

    def message_key(self, op: Instruction) -> tuple[str, int, int]:
        """``message_of(op)`` for the whole group: named by the group's first micro-batch."""
        kind, stage, micro_batch = message_of(op)
        return kind, stage, self.message_group(micro_batch)[0]

    def reads(self, op: Instruction) -> tuple[str, int, int] | None:
        """The received message (``message_key``) compute ``op`` reads, if any.

        A receive is posted where it stands; its rank waits for the data only here, at
        the first op that reads it (the forward of its input, the backward of its
        output's gradient), so a receive posted early never holds compute up.
        """
        if not isinstance(op, (Forward, Backward, BackwardInput)):
            return None
        stage, first = op.stage, self.message_group(op.micro_batch)[0]
        if isinstance(op, Forward):
            remote = stage > 0 and self.rank_of(stage - 1) != self.rank_of(stage)
            return ("activation", stage, first) if remote else None
        remote = stage < self.num_model_stages - 1 and self.rank_of(stage + 1) != self.rank_of(stage)
        return ("grad", stage, first) if remote else None

    @property
    def num_model_stages(self) -> int:
        """p * v: the number of model stages (chunks) the model is cut into."""
        return self.num_stages * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """Pipe rank that runs model stage ``stage``."""
        return stage % self.num_stages

    def stages_of(self, rank: int) -> list[int]:
        """Model stages that pipe rank ``rank`` runs, first chunk first."""
        return [rank + k * self.num_stages for k in range(self.virtual_stages)]

    def table(self) -> str:
        """Every rank's stream as one row, instruction positions as columns."""
        cells = [[str(op) for op in stream] for stream in self.streams]
        length = max((len(row) for row in cells), default=0)
        width = max([len(str(length))] + [len(c) for row in cells for c in row])
        label = max(len(f"rank {len(cells) - 1}"), 4)
        header = " " * label + " | " + " ".join(f"{i:>{width}}" for i in range(length))
        lines = [
            f"{self.name}: stages={self.num_stages} micro_batches={self.micro_batches} "
            f"virtual_stages={self.virtual_stages}"
            + (f" coalesce={self.coalesce}" if self.coalesce > 1 else ""),
            header,
        ]
        for rank, row in enumerate(cells):
            body = " ".join(f"{c:>{width}}" for c in row)
            lines.append(f"{f'rank {rank}':<{label}} | {body}")
        return "\n".join(lines)
