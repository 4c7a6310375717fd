"""The planner: pick a pipe x data x tensor grid, schedule, micro-batch count and ZeRO setting
for a model and a cluster, and predict step time, memory per device and MFU (no torch here).

Timing goes through ``pipegrid.schedules.simulate``; FLOPs follow Narayanan et al. (SC'21).
``pipegrid.plan.profile`` (torch, imported on use) measures layer costs on this device, and
``pipegrid.plan.replay`` op costs in a schedule's own order.
"""

from pipegrid.plan.choice import Choice, choose
from pipegrid.plan.hardware import GEMM_EFFICIENCY, ClusterSpec, DeviceSpec, Link
from pipegrid.plan.hf_config import transformer_config_from_hf
from pipegrid.plan.memory import REPORT_KEYS, OptimizerSpec, activation_bytes, memory_report
from pipegrid.plan.model import (
    LayerCost, TransformerConfig, megatron_flops_per_step, transformer_layers,
)
from pipegrid.plan.predict import (
    Candidate, Prediction, micro_batches_of, predict, predict_transformer, ring_allreduce_s, split_chunks,
)
from pipegrid.plan.presets import cluster_from_dict, model_from_dict
from pipegrid.plan.search import SearchSpace, candidates, explain, search
from pipegrid.plan.simulation import StepSimulation, simulate_step

__all__ = [
    "Candidate", "Choice", "ClusterSpec", "DeviceSpec", "GEMM_EFFICIENCY", "LayerCost", "Link", "OptimizerSpec",
    "Prediction", "REPORT_KEYS", "SearchSpace", "StepSimulation", "TransformerConfig",
    "activation_bytes", "candidates", "choose", "cluster_from_dict", "explain", "megatron_flops_per_step",
    "memory_report", "micro_batches_of", "model_from_dict", "predict", "predict_transformer",
    "ring_allreduce_s", "search", "simulate_step", "split_chunks", "transformer_config_from_hf",
    "transformer_layers",
]
