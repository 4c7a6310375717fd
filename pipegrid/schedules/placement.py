"""``Placement``: the one map from model stage to pipe rank; nothing else does that arithmetic.

``loop`` (Megatron's interleaving) puts stage s on rank s % p; ``v`` zigzags, so with two
chunks rank r holds stages r and 2p-1-r and the first and last stage share rank 0::

    loop, p=3, 2 chunks:  rank 0: 0 3   rank 1: 1 4   rank 2: 2 5
    v,    p=3, 2 chunks:  rank 0: 0 5   rank 1: 1 4   rank 2: 2 3
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipegrid.schedules.errors import ScheduleError

__all__ = ["PLACEMENTS", "Placement"]

PLACEMENTS: tuple[str, ...] = ("loop", "v")


@dataclass(frozen=True)
class Placement:
    """Which pipe rank runs each of ``num_ranks * chunks`` model stages."""

    kind: str
    """``loop``: stage s on rank s % p. ``v``: chunk k runs down the ranks when k is even
    and back up when it is odd (rank r holds r and 2p-1-r with two chunks)."""
    num_ranks: int
    """Pipeline degree p."""
    chunks: int = 1
    """Model stages (chunks) per rank: ``virtual_stages``."""
    _ranks: tuple[int, ...] = field(init=False, repr=False, compare=False)  # stage -> rank, asked very often

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENTS:
            raise ScheduleError(f"stage placement must be one of {', '.join(PLACEMENTS)}, got {self.kind!r}; "
                                "use 'loop' (stage s on rank s % p) or 'v' (rank r holds stages r and 2p-1-r)")
        for label, value in (("num_ranks", self.num_ranks), ("virtual_stages", self.chunks)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ScheduleError(f"{label} must be >= 1, got {value}; set {label}=1 or more")
        p = self.num_ranks
        ranks = tuple(p - 1 - s % p if self.kind == "v" and (s // p) % 2 else s % p for s in range(p * self.chunks))
        object.__setattr__(self, "_ranks", ranks)

    @property
    def num_stages(self) -> int:
        """p * chunks: the model stages the model is cut into."""
        return self.num_ranks * self.chunks

    def rank_of(self, stage: int) -> int:
        """The pipe rank that runs model stage ``stage``."""
        if stage < 0:
            raise ValueError(f"model stage must be in [0, {self.num_stages}), got {stage}")
        try:
            return self._ranks[stage]
        except IndexError:
            raise ValueError(f"model stage must be in [0, {self.num_stages}), got {stage}") from None

    def stages_of(self, rank: int) -> list[int]:
        """The model stages pipe rank ``rank`` runs, its first chunk first."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"pipe rank must be in [0, {self.num_ranks}), got {rank}")
        p = self.num_ranks
        if self.kind == "v":
            return [k * p + (p - 1 - rank if k % 2 else rank) for k in range(self.chunks)]
        return [k * p + rank for k in range(self.chunks)]

    def chunk_of(self, stage: int) -> int:
        """Which of its rank's chunks model stage ``stage`` is (0 for the first)."""
        return stage // self.num_ranks

    def same_rank(self, stage: int, other: int) -> bool:
        """Whether two model stages run on one rank (tensors pass between them in memory)."""
        return self.rank_of(stage) == self.rank_of(other)

    def remote_before(self, stage: int) -> bool:
        """Whether ``stage``'s input comes from another rank (stage 0's comes from the data)."""
        return stage > 0 and self._ranks[stage - 1] != self._ranks[stage]

    def remote_after(self, stage: int) -> bool:
        """Whether ``stage``'s output gradient comes from another rank (the last stage's: its loss)."""
        return stage < len(self._ranks) - 1 and self._ranks[stage + 1] != self._ranks[stage]

    def describe(self) -> str:
        """``rank 0: 0 5 | rank 1: 1 4 | ...``: every rank's stages, for error messages."""
        return " | ".join(f"rank {r}: {' '.join(map(str, self.stages_of(r)))}" for r in range(self.num_ranks))
