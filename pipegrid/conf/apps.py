"""Schemas of the example applications: a TrainConfig plus ``model`` and ``data`` sections.

``GPTAppConfig`` backs ``gpt.yaml`` (examples/train_gpt.py), ``MLPAppConfig`` backs
``mlp.yaml`` (examples/train_mlp.py). Being TrainConfigs, either goes straight to
``pipegrid.initialize``; the engine ignores the extra sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from pipegrid.conf.schema import TrainConfig


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or value <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {value!r}")


@dataclass
class GPTModelConfig:
    vocab_size: int = 128
    """Embedding rows; the characters of the text must fit (padded so tensor parallel divides it)."""
    seq_len: int = 64
    """Context length in tokens (characters)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Hidden width."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP."""
    sequence_parallel: bool = False
    """Split norms, residuals and pipeline messages along the sequence over topology.tensor (needs tensor > 1)."""

    LAYERS_KNOB: ClassVar[str] = "model.n_layer"

    def pipeline_layers(self) -> int:
        """Layers examples/models/gpt.py's GPT lists for the pipeline to cut: token embedding,
        positions, the n_layer blocks, final norm, tied head (tests/unit/test_conf.py pins it)."""
        return self.n_layer + 4

    def __post_init__(self) -> None:
        _positive("model", vocab_size=self.vocab_size, seq_len=self.seq_len, n_layer=self.n_layer,
                  n_head=self.n_head, n_embd=self.n_embd)
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be a multiple of model.n_head={self.n_head}; "
                             "change one of them")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TextDataConfig:
    text: str = "pydoc"
    """'pydoc' (Python's own language reference, shipped with it) or a path to a UTF-8 text file."""
    val_fraction: float = 0.1
    """The last this fraction of the text is held out for validation."""
    micro_batch_size: int = 16
    """Sequences per micro-batch."""

    def __post_init__(self) -> None:
        _positive("data", micro_batch_size=self.micro_batch_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EvalConfig:
    interval: int = 50
    """Steps between validation losses (0: only at the end)."""
    batches: int = 4
    """eval_batch calls (each of schedule.micro_batches micro-batches) per validation loss."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"eval.interval must be >= 0 (0: only at the end), got {self.interval}")
        _positive("eval", batches=self.batches)


@dataclass
class SampleConfig:
    length: int = 120
    """Characters to generate after training (0: no sample); each costs one pipeline forward."""
    temperature: float = 0.7
    """Softmax temperature; 0 picks the most likely character (greedy)."""

    def __post_init__(self) -> None:
        if self.length < 0 or self.temperature < 0:
            raise ValueError(f"sample.length and sample.temperature must be >= 0, "
                             f"got {self.length} and {self.temperature}")


@dataclass
class GPTAppConfig(TrainConfig):
    """examples/train_gpt.py: a character-level GPT on a text shipped with Python."""

    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics_file: Optional[str] = "metrics.csv"
    """CSV of per-step metrics, relative to the run's output directory (None: none)."""


@dataclass
class MLPModelConfig:
    in_features: int = 16
    """Input width."""
    width: int = 64
    """Hidden width of every residual block."""
    depth: int = 4
    """Hidden blocks (the pipeline cuts between them)."""

    LAYERS_KNOB: ClassVar[str] = "model.depth"

    def pipeline_layers(self) -> int:
        """Layers examples/train_mlp.py's model lists: input linear, the depth blocks, output
        linear (tests/unit/test_conf.py pins it)."""
        return self.depth + 2

    def __post_init__(self) -> None:
        _positive("model", in_features=self.in_features, width=self.width, depth=self.depth)


@dataclass
class RegressionDataConfig:
    micro_batch_size: int = 32
    """Samples per micro-batch."""
    noise: float = 0.05
    """Standard deviation of the noise on the targets."""

    def __post_init__(self) -> None:
        _positive("data", micro_batch_size=self.micro_batch_size)


@dataclass
class MLPAppConfig(TrainConfig):
    """examples/train_mlp.py: regress a fixed random function with a residual MLP."""

    model: MLPModelConfig = field(default_factory=MLPModelConfig)
    data: RegressionDataConfig = field(default_factory=RegressionDataConfig)
