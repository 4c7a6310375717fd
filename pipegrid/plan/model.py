"""Cost model of a model's layers: FLOPs, bytes moved, parameters and activations per layer.

``LayerCost`` is the planner's unit: one layer, one micro-batch, one tensor-parallel rank.
``transformer_layers`` derives it for a GPT-style model from Megatron's formulas
(Narayanan et al., SC'21, arXiv 2104.04473, eq. 3); ``pipegrid.plan.profile`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChunkCost", "LayerCost", "TransformerConfig", "transformer_layers", "megatron_flops_per_step"]

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
    ffn: int = 0
    """MLP width (0: 4 x hidden, GPT's)."""
    kv_heads: int = 0
    """Key/value heads (0: one per attention head; fewer: grouped-query attention)."""
    gated_mlp: bool = False
    """The MLP has a gate projection beside up (SwiGLU, Llama's): three matrices, not two."""
    tied: bool = True
    """The LM head is the embedding's weight; False: a second vocab x hidden matrix."""
    sequence_parallel: bool = False
    """At tensor > 1, Megatron's sequence parallelism (``hf.from_pretrained(..., sequence_parallel=True)``,
    the GPT example's ``model.sequence_parallel``): norms, residuals, dropout and the stage messages
    hold 1/t of the tokens. True here is the user's forced choice: the planner then proposes it at every
    tensor > 1 (False: the planner weighs it, ``Candidate.sequence_parallel``)."""

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "seq_len", "vocab", "global_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"{self.name}: hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def block_matrix_parameters(self) -> int:
        """Weights of one block's matrices: q and output h^2 each, k and v h x kv_heads x head_dim
        each, the MLP's 2 (3 gated) h x ffn; GPT's 12 h^2."""
        h, kv = self.hidden, self.kv_heads or self.heads
        return 2 * h * h + 2 * h * kv * (h // self.heads) + (3 if self.gated_mlp else 2) * h * (self.ffn or 4 * h)

    @property
    def parameters(self) -> int:
        """Total parameters: l (M + 13 h) + (V + s) h (+ V h untied); GPT: the paper's
        12 l h^2 (1 + 13/(12h)) + (V + s) h."""
        h = self.hidden
        head = 0 if self.tied else self.vocab * h
        return self.layers * (self.block_matrix_parameters + 13 * h) + (self.vocab + self.seq_len) * h + head

    def splits_over(self, tensor: int) -> bool:
        """Whether heads, key/value heads and the vocabulary divide over ``tensor`` ranks."""
        return not (self.heads % tensor or (self.kv_heads or self.heads) % tensor or self.vocab % tensor)


@dataclass(frozen=True)
class ChunkCost:
    """One pipeline chunk (model stage) for one micro-batch, measured as the engine runs it.

    A chunk is not the sum of its layers: each op pays a fixed overhead (dispatch, autograd
    graph walk) that does not halve when the chunk does, the first chunk has no input
    gradient to compute, the last adds the loss, and a split backward (I then W) costs more
    than a whole one. ``pipegrid.plan.profile.profile_chunks`` measures these.
    """

    forward_s: float
    """Forward seconds (the last chunk's includes the loss)."""
    backward_s: float
    """Whole backward seconds (B)."""
    input_s: float = 0.0
    """Split backward, input-gradient half (I); about 0 for the first chunk."""
    weight_s: float = 0.0
    """Split backward, weight-gradient half (W)."""

    def stage_costs(self, split: bool, slowdown: float = 1.0) -> dict[str, float]:
        """The simulator's F, B, W for this chunk under a schedule with or without split backward."""
        if split:  # a whole backward the schedule keeps (DualPipeV's) costs what it measured, not I + W
            whole = {"BW": self.backward_s * slowdown} if self.backward_s > 0 else {}
            return {"F": self.forward_s * slowdown, "B": self.input_s * slowdown, "W": self.weight_s * slowdown,
                    **whole}
        return {"F": self.forward_s * slowdown, "B": self.backward_s * slowdown, "W": 0.0}


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
    """Tensor-parallel all-reduces per forward (the same number again in backward); under sequence
    parallelism each is a reduce-scatter + all-gather pair of the same tensor (the same ring bytes)."""
    sequence_regathers: int = 0
    """Sequence parallelism only: all-gathers of ``tensor_allreduce_bytes`` that backward adds, one per
    column-parallel group (attention's q/k/v, the MLP's up/gate), re-gathering the input chunk kept
    for the weight gradient (``pipegrid.tensor.sequence.Regather``, Megatron's trick)."""
    forward_s: float | None = None
    """Measured forward seconds (overrides the FLOP-based time)."""
    backward_s: float | None = None
    """Measured backward seconds."""


def _block(cfg: TransformerConfig, micro_batch: int, tensor: int, sequence_parallel: bool) -> LayerCost:
    b, s, h, a, t = micro_batch, cfg.seq_len, cfg.hidden, cfg.heads, tensor
    width = DTYPE_BYTES[cfg.dtype]
    # Narayanan et al. eq. 3 per layer: 24 b s h^2 (1 + s / (6h)) forward, 2x that backward;
    # 2 b s M + 4 b s^2 h for any block's matrices M (24 b s h^2 is GPT's 12 h^2).
    matrices = cfg.block_matrix_parameters
    forward = (2 * b * s * matrices + 4 * b * s * s * h) / t
    # Memory-bound traffic (tensor reads + writes, Megatron's fused kernels): norms and the
    # two bias-dropout-residual adds touch b s h on every rank (~12 passes), bias-GeLU the
    # 4h intermediate once each way, scale-mask-softmax + dropout the b a s^2 scores ~5 times.
    # Sequence parallelism runs those b s h passes on 1/t of the tokens, on each rank.
    tokens = 1 / t if sequence_parallel else 1.0
    elementwise = (12 * b * s * h * tokens + 2 * b * s * 4 * h / t + 5 * b * a * s * s / t) * width
    # Korthikanti et al. (arXiv 2205.05198) eq. 2: s b h (10 + 24/t + 5 a s / (h t)) bytes (16-bit);
    # eq. 4 with sequence parallelism: s b h (34/t + 5 a s / (h t)), the 10 whole ones split too.
    stored = s * b * h * (10 * tokens + 24 / t + 5 * a * s / (h * t)) * width / 2
    return LayerCost(
        name="block", parameters=(matrices + 13 * h) // t, forward_flops=forward,
        backward_flops=2 * forward, forward_memory_bytes=elementwise, activation_bytes=stored,
        checkpoint_bytes=b * s * h * width * tokens, output_bytes=b * s * h * width * tokens,
        tensor_allreduce_bytes=b * s * h * width if t > 1 else 0.0, tensor_allreduces=2 if t > 1 else 0,
        sequence_regathers=2 if sequence_parallel else 0)


def transformer_layers(cfg: TransformerConfig, micro_batch: int, tensor: int = 1,
                       sequence_parallel: bool | None = None) -> list[LayerCost]:
    """[embedding, block x layers, logits]: Megatron's layer list, per tensor-parallel rank.
    ``sequence_parallel``: None takes ``cfg.sequence_parallel``; it does nothing at tensor 1."""
    if micro_batch < 1 or tensor < 1:
        raise ValueError(f"micro_batch and tensor must be >= 1, got {micro_batch} and {tensor}")
    sequence_parallel = (cfg.sequence_parallel if sequence_parallel is None else sequence_parallel) and tensor > 1
    if not cfg.splits_over(tensor):
        raise ValueError(f"{cfg.name}: tensor={tensor} must divide heads={cfg.heads} and kv_heads="
                         f"{cfg.kv_heads or cfg.heads}; pick a tensor degree that divides the head counts")
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
    return [embed, *[_block(cfg, micro_batch, tensor, sequence_parallel) for _ in range(cfg.layers)], logits]


def megatron_flops_per_step(cfg: TransformerConfig, recompute: bool | None = None) -> float:
    """Narayanan et al. eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with recomputation
    (four passes per layer); 72 B s l h^2 (...) counts model FLOPs only (three passes)."""
    recompute = cfg.recompute if recompute is None else recompute
    passes = 4 if recompute else 3
    b, s, l, h = cfg.global_batch, cfg.seq_len, cfg.layers, cfg.hidden
    per_pass = l * (2 * b * s * cfg.block_matrix_parameters + 4 * b * s * s * h) + 2 * b * s * h * cfg.vocab
    # logits layer: 3 passes (never recomputed), as in eq. 3's V/(16 l h) term
    logits = 2 * b * s * h * cfg.vocab
    return passes * (per_pass - logits) + 3 * logits
