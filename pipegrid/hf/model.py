"""``from_pretrained`` / ``from_config``: a transformers causal LM as a PipelineModule whose
process holds only its own stages, read from a checkpoint or initialised as transformers
initialises that model.

Everything that can be wrong with the input (a missing directory, no safetensors, an
architecture that cannot be pipelined, tensors that disagree with config.json, a model
that cannot be split over topology.tensor) is checked from config.json and the safetensors
headers alone, the same way on every rank, before any layer is built and before any collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipegrid.conf.schema import LossConfig
from pipegrid.hf.fused_head import FusableHead
from pipegrid.hf.layers import TIED_KEY, layer_specs
from pipegrid.hf.pp_plan import PlanEntry, plan_for, read_config_json
from pipegrid.hf.skeleton import Skeleton
from pipegrid.hf.weights import CheckpointWeights
from pipegrid.pipe.module import PipelineModule
from pipegrid.pipe.spec import TiedLayerSpec
from pipegrid.tensor import LMLoss, SequenceParallel, vocab_parallel_cross_entropy
from pipegrid.topology.grid import Topology


class CausalLMLoss:
    """The model's own causal-LM loss of one micro-batch (transformers' ``ForCausalLMLoss``
    for causal LMs): labels shifted inside, -100 ignored, mean over the counted tokens."""

    def __init__(self, loss_function: Callable[..., torch.Tensor], vocab_size: int) -> None:
        self.loss_function = loss_function
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)


class VocabParallelCausalLMLoss:
    """The causal-LM loss of logits split along the vocabulary over the tensor group, never
    gathered: labels shifted as transformers' ``ForCausalLMLoss`` does, -100 ignored, mean over
    the counted tokens, the softmax in float32."""

    def __init__(self, tensor_group: Any) -> None:
        self.tensor_group = tensor_group

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
        return vocab_parallel_cross_entropy(logits.float(), shifted, self.tensor_group)


class _CheckpointSource:
    """Fills materialised modules from a checkpoint, one tensor (or one tensor shard) at a time."""

    reads_whole = False

    def __init__(self, weights: CheckpointWeights) -> None:
        self.weights = weights

    def fill(self, skeleton: Skeleton, module: nn.Module, name: str) -> None:
        tied = skeleton.tied_head_key()
        for local, tensor in module.state_dict(keep_vars=True).items():
            key = f"{name}.{local}"
            if key != tied:
                rule = skeleton.shard_rule(key)
                shard = None if rule is None else (rule, skeleton.split.rank, skeleton.split.parts)
                self.weights.read_into(tensor, key, shard)
                tensor._is_hf_initialized = True  # transformers' init then leaves it alone
        self.weights.release()
        skeleton.init_weights(module)  # what no checkpoint stores: rotary tables and other computed buffers


class _RandomInit:
    """Initialises materialised modules as transformers does (under the layer's seed)."""

    reads_whole = True

    def fill(self, skeleton: Skeleton, module: nn.Module, name: str) -> None:
        skeleton.init_weights(module)


class HFCausalLM(PipelineModule):
    """A transformers causal LM cut into pipeline stages; this process holds only its own.

    Build it with :func:`from_pretrained` or :func:`from_config`. Micro-batches are
    ``(input_ids, labels)`` or ``((input_ids, attention_mask), labels)``; the loss is the
    model's causal-LM loss, its head and cross-entropy chunked over the tokens as ``loss``
    (default: the engine config's ``loss:`` section) says. ``hf_state_dict()`` gives the local tensors under their
    transformers names; :func:`pipegrid.hf.save_pretrained` writes them back.
    """

    def __init__(self, skeleton: Skeleton, topology: Topology | None = None, *,
                 partition_method: Any = "parameters", activation_checkpoint_interval: int = 0,
                 seed: int = 1234, loss: LossConfig | None = None, **pipeline_kwargs: Any) -> None:
        skeleton.materialise_unplanned()
        plain: Any = CausalLMLoss(skeleton.shell.loss_function, skeleton.config.vocab_size)
        if skeleton.split is not None:
            plain = VocabParallelCausalLMLoss(skeleton.split.group)
        # the head hands the loss its inputs when loss.chunked allows (the engine's config, or ``loss``)
        group = skeleton.split.group if skeleton.split is not None else None
        lm_loss = LMLoss(loss, group, shift_labels=True, plain=plain)
        specs = layer_specs(skeleton, FusableHead(skeleton, lm_loss))
        super().__init__(specs, loss_fn=lm_loss, topology=topology, partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval, seed=seed,
                         **pipeline_kwargs)
        self.skeleton = skeleton
        skeleton.tensor_rng.manual_seed(seed, self.pipe_rank)  # Megatron's offsets: tensor/random.py

    @property
    def process_groups(self) -> Any:
        """The ProcessGroups built for this model's tensor group (None when the caller passed one,
        or tensor = 1): ``pg.initialize(model, config)`` uses them."""
        return self.skeleton.process_groups

    @property
    def sequence_parallel(self) -> SequenceParallel:
        """The switch the sequence-parallel layers consult (falsy when off); ``engine.generate`` turns it off."""
        return self.skeleton.sequence_parallel

    @property
    def hf_config(self) -> Any:
        """The transformers config of the whole model."""
        return self.skeleton.config

    @property
    def max_positions(self) -> int | None:
        """How many positions the model was made for (``engine.generate`` refuses longer)."""
        config = self.skeleton.config.get_text_config(decoder=True)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def vocab_parallel_group(self) -> Any:
        """The tensor group the logits are split over (vocab-parallel head), None when whole."""
        return self.skeleton.split.group if self.skeleton.split is not None else None

    def new_generation_cache(self, stage: int) -> Any:
        """A stage's KV cache for one micro-batch: transformers' DynamicCache, its layers only."""
        from pipegrid.hf.kv_cache import StageDynamicCache
        from pipegrid.hf.layers import DecoderLayer

        owned = [layer.index for _, layer in self.local_layers(stage) if isinstance(layer, DecoderLayer)]
        return StageDynamicCache(self.skeleton.config, owned)

    def writes_tied_embedding(self) -> bool:
        """The first pipe rank holding the tied embedding stores it (once, as transformers does)."""
        owners = self.tied_pipe_ranks().get(TIED_KEY)
        return bool(owners) and min(owners) == self.pipe_rank

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This process's tensors under their transformers names, each stored once in the model.

        Collective over the tensor group when it is split: every shard is gathered into the
        whole tensor the checkpoint stores (each tensor rank of a stage gets them all).
        """
        tensors: dict[str, torch.Tensor] = {}
        for stage in self.stage_ids:
            for index, layer in self.local_layers(stage):
                if isinstance(self.layer_specs[index], TiedLayerSpec) and not self.writes_tied_embedding():
                    continue
                for key, tensor in layer.hf_tensors():
                    tensors.setdefault(key, tensor)
        return {key: self._whole(key, tensor) for key, tensor in tensors.items()}

    def _whole(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        rule = self.skeleton.shard_rule(key)
        if rule is None:
            return tensor
        split = self.skeleton.split
        shards = [torch.empty_like(tensor) for _ in range(split.parts)]
        dist.all_gather(shards, tensor.detach().contiguous(), group=split.group)
        return rule.assemble(shards)

    def hf_shard_keys(self) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
        """pipe rank -> (key, shape) of the tensors it stores: every rank's, from the skeleton alone."""
        shards: dict[int, list[tuple[str, tuple[int, ...]]]] = {r: [] for r in range(self.pipe)}
        seen: set[str] = set()
        for index, spec in enumerate(self.layer_specs):
            owner = self.pipe_rank_of(self.layer_owner(index))
            if isinstance(spec, TiedLayerSpec):
                owner = min(self.tied_pipe_ranks()[spec.key])
            for name in spec.hf_modules:  # whole shapes: this rank's own modules may be split by now
                for key, shape in self.skeleton.full_shapes.items():
                    if key.startswith(f"{name}.") and key not in seen and key != self.skeleton.tied_head_key():
                        seen.add(key)
                        shards[owner].append((key, shape))
        return shards


def _dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    """As transformers' from_pretrained reads it: None is torch's default, "auto" the config's."""
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        stored = getattr(config, "dtype", None)
        return _dtype(stored, config) if stored not in (None, "auto") else torch.get_default_dtype()
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, its name or 'auto', got {dtype!r}")
        return value
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, its name or 'auto', got {type(dtype).__name__}")
    return dtype


def from_pretrained(path: str, topology: Topology | None = None, *, dtype: torch.dtype | str | None = None,
                    partition_method: Any = "parameters", activation_checkpoint_interval: int = 0,
                    seed: int = 1234, attn_implementation: str | None = None,
                    pp_plan: Mapping[str, PlanEntry] | None = None, tensor_group: Any = None,
                    sequence_parallel: bool = False, **pipeline_kwargs: Any) -> HFCausalLM:
    """A transformers checkpoint directory (config.json + safetensors) as pipeline stages.

    Each process materialises only its own stages' modules and reads only their tensors.
    ``dtype`` is what the weights are held in until the engine casts them (None: torch's
    default, as in transformers; "auto": config.json's). ``pp_plan`` overrides the
    config's ``base_model_pp_plan``. Other keywords go to :class:`PipelineModule`
    (``virtual_stages``, ``pipe``/``pipe_rank`` without a topology, ...).

    ``topology.tensor > 1`` splits every stage over the topology's tensor group by the config's
    ``base_model_tp_plan``; each rank then reads only its slice of each split tensor. The groups
    are pipegrid's own, built here from the topology (torch.distributed joined from torchrun's
    variables if need be) and handed to ``pg.initialize``; ``tensor_group=`` (e.g.
    ``pg.init_distributed(config).tensor_parallel_group``) uses the caller's instead.

    ``sequence_parallel=True`` (needs ``topology.tensor > 1``) also splits the sequence over the
    tensor group between the split layers: after the embedding prefix each rank holds T / tensor of
    the tokens (norms, residuals and pipeline messages 1/tensor), each attention and MLP gathers
    them and reduce-scatters its output, and the head gathers them (docs/hf_tensor_parallel.md).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    stored = read_config_json(path)
    model_type = stored.get("model_type")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ValueError(f"hf.from_pretrained: {path}/config.json names model_type {model_type!r}, which "
                         f"transformers {transformers.__version__} does not know; upgrade transformers or fix "
                         "config.json")
    config = AutoConfig.from_pretrained(path)
    weights = CheckpointWeights(path)
    skeleton = Skeleton(config, plan_for(config, pp_plan), _CheckpointSource(weights), _dtype(dtype, config),
                        attn_implementation, topology, tensor_group, sequence_parallel)
    weights.bind(skeleton.shell)
    weights.check(skeleton.expected_tensors(), where=f"{skeleton.plan.class_name} built from config.json")
    return HFCausalLM(skeleton, topology, partition_method=partition_method,
                      activation_checkpoint_interval=activation_checkpoint_interval, seed=seed, **pipeline_kwargs)


def from_config(config: Any, topology: Topology | None = None, *, dtype: torch.dtype | str | None = None,
                partition_method: Any = "parameters", activation_checkpoint_interval: int = 0,
                seed: int = 1234, attn_implementation: str | None = None,
                pp_plan: Mapping[str, PlanEntry] | None = None, tensor_group: Any = None,
                sequence_parallel: bool = False, **pipeline_kwargs: Any) -> HFCausalLM:
    """A randomly initialised model of ``config`` (a transformers ``PretrainedConfig``) as pipeline stages.

    Each module is initialised by the model's own ``_init_weights``; pipeline layer i
    draws from ``seed + i`` (the tied embedding from ``seed``) whatever stage builds it,
    so every layout starts from bit-identical weights.
    """
    config = copy.deepcopy(config)
    skeleton = Skeleton(config, plan_for(config, pp_plan), _RandomInit(), _dtype(dtype, config), attn_implementation,
                        topology, tensor_group, sequence_parallel)
    return HFCausalLM(skeleton, topology, partition_method=partition_method,
                      activation_checkpoint_interval=activation_checkpoint_interval, seed=seed, **pipeline_kwargs)
