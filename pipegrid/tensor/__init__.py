"""Tensor parallelism (Megatron-LM style): layers split across a tensor-parallel group,
the mappings between replicated and split activations, and a vocab-parallel loss (also fused
with the LM head, chunked over tokens: :mod:`.linear_cross_entropy`).

Every layer and mapping takes ``group``: pass ``groups.tensor_parallel_group``;
``None`` (or a one-rank group) means dense. See :mod:`pipegrid.tensor.mappings`; sequence
parallelism (activations split along the sequence between the regions): :mod:`.sequence`; the
dropout stream that differs per tensor rank inside the regions: :mod:`.random`.
"""

from pipegrid.tensor.cross_entropy import vocab_parallel_cross_entropy
from pipegrid.tensor.layers import (ColumnParallelLinear, RowParallelLinear, SharedInputCopy, VocabParallelEmbedding,
                                    is_tensor_sharded)
from pipegrid.tensor.linear_cross_entropy import LMHeadInputs, LMLoss, linear_cross_entropy
from pipegrid.tensor.mappings import (copy_to_region, gather_from_region, reduce_from_region, split_to_region,
                                      tensor_parallel_rank, tensor_parallel_size)
from pipegrid.tensor.random import TensorParallelRNG, checkpoint_context, rng_trackers
from pipegrid.tensor.sequence import (SequenceParallel, all_gather_sequence, gather_from_sequence_region,
                                      is_sequence_parallel, mark_sequence_parallel, reduce_scatter_sequence,
                                      scatter_to_sequence_region)

__all__ = [
    "ColumnParallelLinear",
    "LMHeadInputs",
    "LMLoss",
    "RowParallelLinear",
    "SequenceParallel",
    "SharedInputCopy",
    "TensorParallelRNG",
    "VocabParallelEmbedding",
    "all_gather_sequence",
    "checkpoint_context",
    "copy_to_region",
    "gather_from_region",
    "gather_from_sequence_region",
    "is_sequence_parallel",
    "is_tensor_sharded",
    "linear_cross_entropy",
    "mark_sequence_parallel",
    "reduce_from_region",
    "reduce_scatter_sequence",
    "rng_trackers",
    "scatter_to_sequence_region",
    "split_to_region",
    "tensor_parallel_rank",
    "tensor_parallel_size",
    "vocab_parallel_cross_entropy",
]
