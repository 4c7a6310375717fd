"""Data for the examples: Python's own documentation as a character-level corpus, and
deterministic random windows of it as (inputs, next-character labels) micro-batches.

The text ships with every CPython (``pydoc_data/topics.py``, ~460k characters of the
language reference), so the GPT example needs no download.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def load_text(source: str = "pydoc") -> str:
    """'pydoc': the language reference text shipped with Python; anything else: a file path."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name] for name in sorted(topics))
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"data.text={source!r} is neither 'pydoc' nor an existing file; "
                         "give a path to a UTF-8 text file")
    return path.read_text(encoding="utf-8")


@dataclass
class Corpus:
    """A text as token ids, split into training and held-out parts."""

    chars: list[str]  # id -> character
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        # ids past the text's characters (the vocabulary is padded) never occur in it: shown as "?"
        return "".join(self.chars[int(i)] if int(i) < len(self.chars) else "?" for i in ids)

    def unigram_entropy(self) -> float:
        """Entropy (nats/char) of the held-out text's own character frequencies: the best
        validation loss of any model that ignores context."""
        counts = torch.bincount(self.val, minlength=len(self.chars)).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


def char_corpus(text: str, vocab_size: int, val_fraction: float) -> Corpus:
    """Characters by falling frequency get ids 0, 1, ...; the last ``val_fraction`` is held out."""
    chars = [c for c, _ in Counter(text).most_common()]
    if len(chars) > vocab_size:
        raise ValueError(f"the text has {len(chars)} distinct characters but model.vocab_size={vocab_size}; "
                         f"set model.vocab_size>={len(chars)}")
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1.0 - val_fraction))
    return Corpus(chars, ids[:cut], ids[cut:])


def random_windows(ids: torch.Tensor, num_micro_batches: int, micro_batch_size: int, seq_len: int,
                   seed: int) -> list[Batch]:
    """``num_micro_batches`` micro-batches of random windows: inputs and labels (B, T), int64.

    The same seed gives the same batches in every process, so the first pipeline stage
    (which reads inputs) and the last (which reads labels) agree without communicating.
    """
    if len(ids) <= seq_len + 1:
        raise ValueError(f"the text ({len(ids)} tokens) is shorter than model.seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (num_micro_batches * micro_batch_size,), generator=gen)
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]  # (M * B, T + 1)
    windows = windows.view(num_micro_batches, micro_batch_size, seq_len + 1)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


def regression_batches(num_micro_batches: int, micro_batch_size: int, in_features: int, noise: float,
                       seed: int) -> list[Batch]:
    """Samples of y = sin(x . w) + noise for a fixed w (the same in every process)."""
    w = torch.randn(in_features, 1, generator=torch.Generator().manual_seed(0)) / math.sqrt(in_features)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_micro_batches, micro_batch_size, in_features, generator=gen)
    y = torch.sin(3 * x @ w) + noise * torch.randn(num_micro_batches, micro_batch_size, 1, generator=gen)
    return list(zip(x, y))
