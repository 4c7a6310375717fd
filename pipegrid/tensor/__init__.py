"""Tensor parallelism (Megatron-LM style): layers split across a tensor-parallel group,
the mappings between replicated and split activations, and a vocab-parallel loss (also fused
with the LM head, chunked over tokens: :mod:`.linear_cross_entropy`).

Every layer and mapping takes ``group``: pass ``groups.tensor_parallel_group``;
``None`` (or a one-rank group) means dense. See :mod:`pipegrid.tensor.mappings`.
"""

from pipegrid.tensor.cross_entropy import vocab_parallel_cross_entropy
from pipegrid.tensor.layers import (ColumnParallelLinear, RowParallelLinear, SharedInputCopy, VocabParallelEmbedding,
                                    is_tensor_sharded)
from pipegrid.tensor.linear_cross_entropy import LMHeadInputs, LMLoss, linear_cross_entropy
from pipegrid.tensor.mappings import (copy_to_region, gather_from_region, reduce_from_region, split_to_region,
                                      tensor_parallel_rank, tensor_parallel_size)

__all__ = [
    "ColumnParallelLinear",
    "LMHeadInputs",
    "LMLoss",
    "RowParallelLinear",
    "SharedInputCopy",
    "VocabParallelEmbedding",
    "copy_to_region",
    "gather_from_region",
    "is_tensor_sharded",
    "linear_cross_entropy",
    "reduce_from_region",
    "split_to_region",
    "tensor_parallel_rank",
    "tensor_parallel_size",
    "vocab_parallel_cross_entropy",
]
