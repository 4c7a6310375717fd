"""Choosing the next token from the last stage's logits: greedy, or sampled with temperature,
top-k and top-p (applied in transformers' order), one seeded generator per sequence so a
sequence draws the same tokens whichever micro-batch, stage or layout it runs in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How ``engine.generate`` picks each token."""

    do_sample: bool = False
    """False: the most likely token (greedy); True: draw from the processed distribution."""
    temperature: float = 1.0
    """Logits are divided by it before top-k/top-p; > 0."""
    top_k: int | None = None
    """Keep the k most likely tokens; None: all."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches top_p, in (0, 1]; None: all."""

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}; use do_sample=False "
                             "for the most likely token")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    def generators(self, rows: int, seed: int) -> list[torch.Generator]:
        """One generator per sequence, seeded ``seed + row``."""
        return [torch.Generator().manual_seed(seed + row) for row in range(rows)]

    def next_tokens(self, logits: torch.Tensor, rows: torch.Tensor,
                    generators: list[torch.Generator]) -> torch.Tensor:
        """(B, V) logits of the sequences ``rows`` -> (B,) int64 tokens."""
        logits = logits.float()
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = self._processed(logits)
        probs = torch.softmax(scores, dim=-1).cpu()
        drawn = [torch.multinomial(probs[i], 1, generator=generators[int(row)]) for i, row in enumerate(rows)]
        return torch.cat(drawn).to(logits.device) if drawn else torch.empty(0, dtype=torch.int64, device=logits.device)

    def _processed(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p, as transformers' logits warpers do."""
        scores = scores / self.temperature
        if self.top_k is not None:
            k = min(self.top_k, scores.size(-1))
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= (1 - self.top_p)
            drop_sorted[..., -1:] = False  # always keep the most likely token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores
