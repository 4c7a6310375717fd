"""The training configuration: dataclasses, one per config group, checked on creation.

Library code takes a :class:`TrainConfig`; dicts and OmegaConf DictConfigs are merged
onto this schema by :func:`to_train_config`, so a typo'd key fails with its name.
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from pipegrid.schedules import ScheduleError
from pipegrid.schedules.registry import SCHEDULES as _SPECS, TRAINING_SCHEDULES

SCHEDULES = TRAINING_SCHEDULES  # the registry's (pipegrid.schedules.registry): one record per schedule
LAYOUT_KEYS = ("topology.pipe", "topology.data", "topology.tensor", "schedule.virtual_stages")
"""Keys a config may leave unset for :func:`pipegrid.initialize` to take from the module."""
DTYPES = ("float32", "bfloat16", "float16", "float64")
KERNEL_BACKENDS = ("auto", "torch", "cupy")  # pipegrid.kernels.backend.BACKENDS (no torch import here)
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao.float8's recipe names (pipegrid.pipe.fp8)
LOSS_CHUNKED = ("auto", "true", "false")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # inductor's


def signal_number(name: str) -> int:
    """``"SIGTERM"`` (or ``"TERM"``) -> its number; ValueError naming the choices otherwise."""
    full = (name if name.upper().startswith("SIG") else f"SIG{name}").upper()
    if full in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, full):
        raise ValueError(f"train.save_on_signal: {name!r} is not a signal a process can handle; use names such "
                         "as SIGTERM, SIGUSR1, SIGUSR2 (an empty list disables saving on a signal)")
    return int(getattr(signal.Signals, full))


@dataclass
class TopologyConfig:
    pipe: Optional[int] = None
    """Pipe ranks: the pipeline degree p (ranks along the pipe axis). None (unset): the module's, else 1."""
    data: Optional[int] = None
    """Data-parallel replicas. None (unset): the module's topology's, else 1."""
    tensor: Optional[int] = None
    """Tensor-parallel shards of each layer. None (unset): the module's topology's, else 1."""

    @property
    def world_size(self) -> int:
        """Processes the topology needs: pipe x data x tensor (an unset size counts 1)."""
        return (self.pipe or 1) * (self.data or 1) * (self.tensor or 1)

    def __post_init__(self) -> None:
        for name in ("pipe", "data", "tensor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"topology.{name} must be a positive integer, got {value!r}")


@dataclass
class ScheduleConfig:
    name: str = "1f1b"
    """One of gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_v, dualpipev (``pipegrid.schedules.SCHEDULES``)."""
    micro_batches: int = 4
    """Micro-batches per optimizer step (gradient accumulation steps)."""
    virtual_stages: Optional[int] = None
    """Model chunks per pipe rank (interleaved_1f1b: any; zb_v, dualpipev: 2). None (unset): the module's, else 1."""
    coalesce: int = 1
    """Micro-batches per message between stages: groups of this many go through the
    pipeline together, each still computed on its own (same results). Fewer messages
    for a longer fill and drain and more activations in flight; worth it when a
    micro-batch's compute is short next to a message's cost."""

    def __post_init__(self) -> None:
        if self.name not in _SPECS or not _SPECS[self.name].training:  # the registry, asked now
            names = [name for name, spec in _SPECS.items() if spec.training]
            raise ValueError(f"schedule.name must be one of {', '.join(names)}, got {self.name!r}")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) \
                or self.micro_batches < 1:
            raise ValueError(f"schedule.micro_batches must be an integer >= 1, got {self.micro_batches!r}")
        if self.virtual_stages is not None and (isinstance(self.virtual_stages, bool)
                                                or not isinstance(self.virtual_stages, int) or self.virtual_stages < 1):
            raise ValueError(f"schedule.virtual_stages must be an integer >= 1, got {self.virtual_stages!r}")
        if isinstance(self.coalesce, bool) or not isinstance(self.coalesce, int) or self.coalesce < 1:
            raise ValueError(f"schedule.coalesce must be an integer >= 1, got {self.coalesce!r}")
        if isinstance(self.micro_batches, int) and self.micro_batches % self.coalesce:
            raise ValueError(f"schedule.micro_batches={self.micro_batches} must be a multiple of "
                             f"schedule.coalesce={self.coalesce}; pick a divisor of {self.micro_batches} "
                             "for schedule.coalesce")
        if self.virtual_stages is not None:
            try:
                _SPECS[self.name].check_chunks(self.virtual_stages)
            except ScheduleError as error:
                raise ValueError(f"schedule.virtual_stages={self.virtual_stages} with schedule.name={self.name!r}: "
                                 f"{error}") from None


@dataclass
class ZeroConfig:
    stage: int = 0
    """0: every data rank keeps the full optimizer state; 1: state sharded over the data axis;
    2: gradients sharded too (each data rank keeps its shard of the reduced gradient);
    3: parameters sharded too (gathered at each step's start, freed after its optimizer step)."""
    reduce_every_micro_batch: bool = False
    """Stage 2/3: reduce the gradients bucket by bucket while each backward runs instead of once
    per step: no full-size gradient buffer (the shard and a few buckets), m times the traffic."""
    bucket_elements: int = 1 << 24
    """Stage 2/3 with reduce_every_micro_batch: elements per gradient bucket (DeepSpeed's
    reduce_bucket_size); 2^24 = 64 MiB of fp32 (pipe/zero/stage2.py says why)."""
    offload_optimizer: str = "none"
    """none | cpu: fp32 master weights and optimizer state (this rank's shard) in host memory,
    the optimizer step on the CPU (ZeRO-Offload); on a CPU-only run it changes nothing."""
    gather: str = "per_step"
    """Stage 3: per_step gathers a pipe rank's whole parameters at the step's start and frees them
    after its optimizer step; per_layer gathers each layer just before each use (forward, backward,
    W, recompute) and frees it after, the next layer's gather in flight meanwhile (least memory,
    most traffic)."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.offload_optimizer not in ("none", "cpu"):
            raise ValueError(f"zero.offload_optimizer must be none or cpu, got {self.offload_optimizer!r}")
        if self.offload_optimizer == "cpu" and self.stage == 0:
            raise ValueError("zero.offload_optimizer=cpu offloads this rank's shard of the optimizer state and "
                             "needs zero.stage >= 1, got zero.stage=0; set zero.stage=1 (or 2)")
        if self.gather not in ("per_step", "per_layer"):
            raise ValueError(f"zero.gather must be per_step or per_layer, got {self.gather!r}")
        if self.gather == "per_layer" and self.stage != 3:
            raise ValueError(f"zero.gather=per_layer gathers ZeRO-3's sharded parameters layer by layer and needs "
                             f"zero.stage=3, got zero.stage={self.stage}; set zero.stage=3 or drop zero.gather")
        if self.bucket_elements < 1:
            raise ValueError(f"zero.bucket_elements must be a positive number of elements, got "
                             f"{self.bucket_elements!r}; e.g. zero.bucket_elements=16777216")
        if self.reduce_every_micro_batch and self.stage < 2:
            raise ValueError(f"zero.reduce_every_micro_batch needs zero.stage=2 or 3, got zero.stage={self.stage}; "
                             "set zero.stage=2 or drop zero.reduce_every_micro_batch")


@dataclass
class PrecisionConfig:
    dtype: str = "float32"
    """Parameter/activation dtype: float32, bfloat16, float16 (or float64 for exact tests)."""
    initial_loss_scale: float = 2.0 ** 16
    """float16 only: starting dynamic loss scale."""
    growth_interval: int = 1000
    """float16 only: overflow-free steps before the scale doubles."""
    backoff_factor: float = 0.5
    """float16 only: scale multiplier after an overflow."""
    hysteresis: int = 1
    """float16 only: overflows tolerated before the scale is lowered."""
    min_loss_scale: float = 1.0
    """float16 only: the scale never goes below this."""
    fp8: bool = False
    """Train each stage's nn.Linear layers in float8 (torchao; CUDA sm_89+), bf16 elsewhere; needs dtype=bfloat16."""
    fp8_recipe: str = "tensorwise"
    """fp8 scaling: tensorwise (one scale per tensor) or rowwise (per row; more accurate, a little slower)."""
    fp8_emulate: bool = False
    """fp8 matmuls emulated in high precision (torchao's emulate): runs anywhere, slowly; for tests."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        # checked whatever the dtype: a wrong value is a wrong config even where it is unused
        if not self.initial_loss_scale > 0 or not self.min_loss_scale > 0:
            raise ValueError("precision.initial_loss_scale and precision.min_loss_scale must be > 0, got "
                             f"{self.initial_loss_scale} and {self.min_loss_scale}")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(f"precision.min_loss_scale={self.min_loss_scale} is above precision.initial_loss_scale="
                             f"{self.initial_loss_scale}; lower min_loss_scale or raise initial_loss_scale")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"precision.backoff_factor must be in (0, 1) (the scale shrinks on overflow), "
                             f"got {self.backoff_factor}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}")
        if self.fp8 and self.dtype != "bfloat16":
            raise ValueError(f"precision.fp8=true keeps everything but the float8 matmuls in bfloat16, got "
                             f"precision.dtype={self.dtype}; set precision.dtype=bfloat16 (precision=bf16)")
        for name in ("growth_interval", "hysteresis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"precision.{name} must be an integer >= 1, got {value!r}")


@dataclass
class TrainLoopConfig:
    """The ``train:`` section: how the training loop runs (steps, clipping, seed, logging, signals)."""

    steps: int = 100
    """Optimizer steps to run (examples)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 1234
    """Seed for layer initialisation (layer i uses seed + i) and data order."""
    log_interval: int = 10
    """Steps between log lines."""
    on_nonfinite: str = "raise"
    """What a NaN/inf loss does in float32/bf16: raise, or skip the step."""
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals after which every rank finishes the step in flight, saves it to checkpoint.dir and
    exits 0 (train_batch raises pipegrid.Preempted); without checkpoint.dir the run ends at once
    saying nothing was saved. Inside a submitit job its preemption signal (SIGUSR2) joins the
    list. [] leaves every signal alone (and spares the per-step flag all-reduce)."""

    def __post_init__(self) -> None:
        for name in self.save_on_signal:
            signal_number(name)
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"train.on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")


@dataclass
class CommConfig:
    backend: str = "auto"
    """auto (nccl with CUDA, gloo otherwise), gloo or nccl."""
    timeout_s: float = 300.0
    """Every collective and point-to-point wait fails after this many seconds."""
    dynamic_shapes: bool = False
    """Negotiate activation shapes for every micro-batch (variable sequence length)."""
    bind_cores: bool = True
    """Pin each local rank's threads to its own share of the host's cores (LOCAL_RANK of
    LOCAL_WORLD_SIZE), when there are at least as many cores as ranks. Set false when
    something else binds the processes (numactl, SLURM's --cpu-bind) or when several jobs
    share the host without a cpuset each (they would all take the same cores)."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"comm.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"comm.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Directory for checkpoints; None disables them."""
    interval: int = 0
    """Save every this many steps (and at the end); 0: only at the end."""


@dataclass
class TraceConfig:
    enabled: bool = False
    """Time every executed instruction (measured bubble, Chrome trace)."""
    path: Optional[str] = None
    """Where to write the merged Chrome-trace JSON."""


@dataclass
class KernelsConfig:
    backend: str = "auto"
    """Flat-buffer kernels: auto, torch or cupy."""

    def __post_init__(self) -> None:
        if self.backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernels.backend must be one of {', '.join(KERNEL_BACKENDS)}, got {self.backend!r}")


@dataclass
class LossConfig:
    """The ``loss:`` section: how the last stage computes the LM head and its cross-entropy."""

    chunked: str = "auto"
    """Head + cross-entropy in chunks of ``chunk_tokens`` tokens, so a micro-batch's full-vocabulary
    logits never exist (Liger's or cut-cross-entropy's kernel on CUDA when installed, a torch path
    elsewhere): ``true``, ``false``, or ``auto`` (on when a micro-batch has more tokens than one chunk
    and the vocabulary, per tensor rank, is wider than the hidden size)."""
    chunk_tokens: int = 1024
    """Tokens per chunk: each chunk holds (chunk_tokens, vocab / tensor) float32 logits at a time."""

    def __post_init__(self) -> None:
        self.chunked = str(self.chunked).lower()  # YAML and the command line give true/false as booleans
        if self.chunked not in LOSS_CHUNKED:
            raise ValueError(f"loss.chunked must be one of {', '.join(LOSS_CHUNKED)}, got {self.chunked!r}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"loss.chunk_tokens must be an integer >= 1, got {self.chunk_tokens!r}")


@dataclass
class CompileConfig:
    """The ``compile:`` section: ``torch.compile`` each pipeline layer of this rank on its own, in
    place (``pipegrid/pipe/compile.py``), as torchtitan compiles each block."""

    enabled: bool = False
    """Compile every built layer (each LayerSpec, each transformers decoder layer, the embedding, the
    norm and the head); parameter names, checkpoints and tied weights stay as they are."""
    backend: str = "inductor"
    """torch.compile backend: inductor (generated C++ or Triton code), aot_eager (traced by dynamo and
    AOTAutograd, no code generated: quick to compile, for tests), or any name torch._dynamo.list_backends() gives."""
    mode: Optional[str] = None
    """inductor only: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs;
    None: inductor's default."""
    fullgraph: bool = False
    """Refuse graph breaks inside a layer: one graph per layer or an error (needs eager_linear off)."""
    dynamic: Optional[bool] = None
    """None: compile for the first shape and once more, with symbolic sizes, when a layer sees another;
    true: symbolic sizes from the start; false: one compile per shape, up to torch._dynamo's recompile_limit."""
    eager_linear: Optional[bool] = None
    """Run each nn.Linear eagerly between the compiled regions, so its weight gradient keeps a backward
    node of its own that a split backward (zb_h1, zb_v, dualpipev) defers to W. None: on for those
    schedules (unless fullgraph), off for the others."""

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"compile.backend must be a backend name such as inductor or aot_eager, "
                             f"got {self.backend!r}")
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise ValueError(f"compile.mode must be null or one of {', '.join(COMPILE_MODES)}, got {self.mode!r}")
        if self.mode is not None and self.backend != "inductor":
            raise ValueError(f"compile.mode={self.mode!r} is an inductor setting, but compile.backend="
                             f"{self.backend!r}; set compile.backend=inductor or compile.mode=null")
        if self.fullgraph and self.eager_linear:
            raise ValueError("compile.fullgraph=true refuses graph breaks, but compile.eager_linear=true breaks "
                             "the graph at every nn.Linear; set one of them to false (or eager_linear=null)")


def _adamw() -> dict[str, Any]:
    return {"_target_": "torch.optim.AdamW", "lr": 1e-3}


@dataclass
class TrainConfig:
    """Everything the engine needs; Hydra composes it, or pass a dict."""

    topology: TopologyConfig = field(default_factory=TopologyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: dict[str, Any] = field(default_factory=_adamw)
    # Any, not dict: OmegaConf cannot merge a command line's {...} into a dict field left null,
    # so `lr_scheduler={_target_:...}` would fail on apps that have none by default
    lr_scheduler: Optional[Any] = None
    """A torch LR scheduler: ``_target_`` and its kwargs; None for a constant rate."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        self._fill_layout()
        if "_target_" not in self.optimizer:
            raise ValueError("optimizer needs a _target_ (e.g. torch.optim.AdamW), "
                             f"got keys {sorted(self.optimizer)}")
        if self.lr_scheduler is not None and not isinstance(self.lr_scheduler, dict):
            raise TypeError(f"lr_scheduler must be a mapping with a _target_ (or null), got "
                            f"{type(self.lr_scheduler).__name__} {self.lr_scheduler!r}")
        if self.lr_scheduler is not None and "_target_" not in self.lr_scheduler:
            raise ValueError("lr_scheduler needs a _target_ (e.g. torch.optim.lr_scheduler.LambdaLR)")
        if self.zero.gather == "per_layer" and self.loss.chunked == "true":
            raise ValueError("loss.chunked=true hands the LM head's weight to the loss after the head's layer has "
                             "run, but zero.gather=per_layer frees each layer's parameters right after it runs; "
                             "set loss.chunked=auto (plain logits under per_layer) or zero.gather=per_step")

    def _fill_layout(self) -> None:
        """Unset (None) layout sizes read 1; which were unset is kept for :func:`pipegrid.initialize`.

        Kept here, not as a field, so that library code, Hydra and ``vars()`` see plain
        ints, and a dict, a DictConfig and a TrainConfig all tell "left out" from "1".
        Idempotent (``__post_init__`` may run again after a merge).
        """
        unset = set(self.__dict__.get("_unset_layout", ()))
        for key in LAYOUT_KEYS:
            section, name = key.split(".")
            if getattr(getattr(self, section), name) is None:
                setattr(getattr(self, section), name, 1)
                unset.add(key)
        self.__dict__["_unset_layout"] = frozenset(unset)

    def is_set(self, key: str) -> bool:
        """Whether the config gave layout key ``key`` (e.g. ``"topology.pipe"``).

        An unset key reads 1 until initialize() takes the module's; assigning any value
        other than 1 afterwards counts as setting it.
        """
        if key not in LAYOUT_KEYS:
            raise ValueError(f"{key!r} is not a layout key; those are {', '.join(LAYOUT_KEYS)}")
        section, name = key.split(".")
        return key not in self.__dict__.get("_unset_layout", ()) or getattr(getattr(self, section), name) != 1


def to_train_config(config: Any = None) -> TrainConfig:
    """A TrainConfig from None, a TrainConfig, a dict or a DictConfig (unknown keys are errors)."""
    if isinstance(config, TrainConfig):
        return config
    from omegaconf import OmegaConf  # OmegaConf, not Hydra: library code never composes

    schema = OmegaConf.structured(TrainConfig)
    if config is None:
        return OmegaConf.to_object(schema)  # type: ignore[return-value]
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)  # type: ignore[arg-type]
    elif OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, DictConfig or pipegrid.TrainConfig, got {type(config).__name__}")
    extra = sorted(set(config) - _fields())
    if extra:
        raise ValueError(f"unknown config keys {extra}; valid top-level keys are {sorted(_fields())}")
    # optimizer/lr_scheduler are free-form kwargs: a given one replaces the default
    # instead of merging into it (SGD must not inherit AdamW's keys)
    replace = {k: config[k] for k in ("optimizer", "lr_scheduler") if k in config}
    rest = {k: v for k, v in config.items() if k not in replace}
    merged = OmegaConf.to_object(_merge_checked(schema, rest))
    for key, value in replace.items():
        setattr(merged, key, dict(value) if isinstance(value, Mapping) else value)
    merged.__post_init__()  # type: ignore[attr-defined]
    return merged  # type: ignore[return-value]


def _merge_checked(schema: Any, values: dict[str, Any]) -> Any:
    """``OmegaConf.merge``, with its errors for an unknown nested key or a value of the wrong
    type turned into pipegrid's: the key's full name, the section's keys, the closest match."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        return OmegaConf.merge(schema, values)
    except ConfigKeyError as error:
        section, _, key = str(error.full_key).rpartition(".")
        valid = sorted(OmegaConf.select(schema, section).keys()) if section else sorted(_fields())
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {section}.{close[0]}?" if close else ""
        raise ValueError(f"unknown config key {error.full_key}; the keys of {section or 'the config'} are "
                         f"{valid}{hint}") from None
    except ValidationError as error:
        first = str(error).splitlines()[0]
        raise ValueError(f"config key {error.full_key}: {first}") from None


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}
