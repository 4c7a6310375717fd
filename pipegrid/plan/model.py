"""Cost model of a model's layers: FLOPs, bytes moved, parameters and activations per layer.

``LayerCost`` is the planner's unit: one layer, one micro-batch, one tensor-parallel rank.
``transformer_layers`` derives it for a GPT-style model from Megatron's formulas
(Narayanan et al., SC'21, arXiv 2104.04473, eq. 3); ``pipegrid.plan.profile`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerCost", "TransformerConfig", "transformer_layers", "megatron_flops_per_step"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class TransformerConfig:
    """A GPT-style decoder: embedding, ``layers`` blocks, logits tied to the embedding."""

    name: str
    """Preset name, e.g. gpt_1t."""
    layers: int
    """Transformer blocks l."""
    hidden: int
    """Hidden size h."""
    heads: int
    """Attention heads a."""
    seq_len: int
    """Sequence length s."""
    vocab: int = 51200
    """Vocabulary size V (Megatron pads GPT-2's to 51200)."""
    global_batch: int = 512
    """Sequences per optimizer step B over all data-parallel replicas."""
    dtype: str = "bfloat16"
    """Parameter/activation dtype; fp32 master weights and Adam state come on top."""
    recompute: bool = True
    """Full activation recomputation (the paper's setting): backward re-runs each forward."""

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "seq_len", "vocab", "global_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"{self.name}: hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def parameters(self) -> int:
        """Total parameters: 12 l h^2 (1 + 13/(12h)) + (V + s) h, the paper's count."""
        h = self.hidden
        return 12 * self.layers * h * h + 13 * self.layers * h + (self.vocab + self.seq_len) * h


@dataclass(frozen=True)
class LayerCost:
    """One layer for one micro-batch on one tensor-parallel rank.

    Either FLOP and byte counts (derived; timed against a device) or measured seconds
    (``forward_s``/``backward_s``, taken as is). Bytes are per rank.
    """

    name: str
    """What the layer is (embedding, block, logits, or the measured class name)."""
    parameters: int
    """Parameters this rank holds for the layer (already divided by the tensor degree)."""
    forward_flops: float = 0.0
    """Matrix-multiply FLOPs of one forward."""
    backward_flops: float = 0.0
    """Matrix-multiply FLOPs of one backward (2x forward), recomputation not included."""
    forward_memory_bytes: float = 0.0
    """Bytes read + written by memory-bound ops (norms, softmax, dropout, GeLU) in forward."""
    activation_bytes: float = 0.0
    """Bytes kept from forward to backward without recomputation."""
    checkpoint_bytes: float = 0.0
    """Bytes kept with full recomputation (the layer's input)."""
    output_bytes: float = 0.0
    """Bytes sent to the next stage when this is a stage's last layer."""
    tensor_allreduce_bytes: float = 0.0
    """Bytes of each of the tensor-parallel all-reduces in forward (2 per block, Megatron)."""
    tensor_allreduces: int = 0
    """Tensor-parallel all-reduces per forward (the same number again in backward)."""
    forward_s: float | None = None
    """Measured forward seconds (overrides the FLOP-based time)."""
    backward_s: float | None = None
    """Measured backward seconds."""


def _block(cfg: TransformerConfig, micro_batch: int, tensor: int) -> LayerCost:
    b, s, h, a, t = micro_batch, cfg.seq_len, cfg.hidden, cfg.heads, tensor
    width = DTYPE_BYTES[cfg.dtype]
    # Narayanan et al. eq. 3 per layer: 24 b s h^2 (1 + s / (6h)) forward, 2x that backward.
    forward = 24 * b * s * h * h * (1 + s / (6 * h)) / t
    # Memory-bound traffic (tensor reads + writes, Megatron's fused kernels): norms and the
    # two bias-dropout-residual adds touch b s h on every rank (~12 passes), bias-GeLU the
    # 4h intermediate once each way, scale-mask-softmax + dropout the b a s^2 scores ~5 times.
    elementwise = (12 * b * s * h + 2 * b * s * 4 * h / t + 5 * b * a * s * s / t) * width
    # Korthikanti et al. (arXiv 2205.05198) eq. 2: s b h (10 + 24/t + 5 a s / (h t)) bytes (16-bit).
    stored = s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * width / 2
    return LayerCost(
        name="block", parameters=(12 * h * h + 13 * h) // t, forward_flops=forward,
        backward_flops=2 * forward, forward_memory_bytes=elementwise, activation_bytes=stored,
        checkpoint_bytes=b * s * h * width, output_bytes=b * s * h * width,
        tensor_allreduce_bytes=b * s * h * width if t > 1 else 0.0, tensor_allreduces=2 if t > 1 else 0)


def transformer_layers(cfg: TransformerConfig, micro_batch: int, tensor: int = 1) -> list[LayerCost]:
    """[embedding, block x layers, logits]: Megatron's layer list, per tensor-parallel rank."""
    if micro_batch < 1 or tensor < 1:
        raise ValueError(f"micro_batch and tensor must be >= 1, got {micro_batch} and {tensor}")
    if cfg.heads % tensor:
        raise ValueError(f"{cfg.name}: tensor={tensor} must divide heads={cfg.heads}; "
                         "pick a tensor degree that divides the head count")
    b, s, h, width = micro_batch, cfg.seq_len, cfg.hidden, DTYPE_BYTES[cfg.dtype]
    embed = LayerCost(name="embedding", parameters=(cfg.vocab * h) // tensor + s * h,
                      forward_memory_bytes=3 * b * s * h * width, checkpoint_bytes=0.0,
                      output_bytes=b * s * h * width)
    logits_flops = 2 * b * s * h * cfg.vocab / tensor  # the paper's 6 B s h V term, 1/3 forward
    logits = LayerCost(name="logits", parameters=(cfg.vocab * h) // tensor + 2 * h,
                       forward_flops=logits_flops, backward_flops=2 * logits_flops,
                       forward_memory_bytes=4 * b * s * cfg.vocab / tensor * 4,  # fp32 softmax + CE
                       activation_bytes=b * s * cfg.vocab / tensor * 4,
                       checkpoint_bytes=b * s * h * width)
    return [embed, *[_block(cfg, micro_batch, tensor) for _ in range(cfg.layers)], logits]


def megatron_flops_per_step(cfg: TransformerConfig, recompute: bool | None = None) -> float:
    """Narayanan et al. eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with recomputation
    (four passes per layer); 72 B s l h^2 (...) counts model FLOPs only (three passes)."""
    recompute = cfg.recompute if recompute is None else recompute
    passes = 4 if recompute else 3
    b, s, l, h = cfg.global_batch, cfg.seq_len, cfg.layers, cfg.hidden
    per_pass = 24 * b * s * l * h * h * (1 + s / (6 * h)) + 2 * b * s * h * cfg.vocab
    # logits layer: 3 passes (never recomputed), as in eq. 3's V/(16 l h) term
    logits = 2 * b * s * h * cfg.vocab
    return passes * (per_pass - logits) + 3 * logits
