"""Train a transformers causal LM through a pipeline, save it with ``hf.save_pretrained``,
then load it with plain transformers and generate: the round trip, on Python's own docs.
The trained pipeline generates too (``engine.generate``), and its greedy tokens must be
what transformers writes from the saved model.

    python examples/finetune_hf.py                         # pretrain a small Llama from scratch, 2 stages
    python examples/finetune_hf.py model.path=DIR train.steps=100 optimizer.lr=3e-4   # fine-tune DIR
    torchrun --nproc-per-node 4 examples/finetune_hf.py model.path=DIR topology.pipe=2 topology.data=2

``model.path`` is a local directory written by ``save_pretrained`` (a download in your
HF_HOME cache works: ~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH); nothing
is downloaded. Without it the model is a Llama-family config of ``model.*`` sizes over
byte tokens (transformers' ByT5 tokenizer, which needs no files). The saved model and its
tokenizer land in ``save_dir`` inside the Hydra run directory.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` and, uninstalled, pipegrid

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import pipegrid as pg
from examples.data import load_text
from pipegrid import hf
from pipegrid.conf.checks import to_app_config
from pipegrid.conf.schema import TrainConfig
from pipegrid.launch import hydra_main, launch, torchrun_world_size

log = logging.getLogger("finetune_hf")


@dataclass
class HFModelConfig:
    path: Optional[str] = None
    """A local transformers checkpoint directory to fine-tune; None: a new Llama-family model of the sizes below."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Grouped-query attention: key/value heads shared by num_heads / num_kv_heads query heads."""
    intermediate_size: int = 384
    attn_implementation: str = "sdpa"
    activation_checkpoint_interval: int = 0
    """Recompute every k layers in backward (0: keep all activations)."""


@dataclass
class HFDataConfig:
    text: str = "pydoc"
    """'pydoc' (Python's language reference, shipped with Python) or a path to a UTF-8 text file."""
    val_fraction: float = 0.05
    micro_batch_size: int = 8
    seq_len: int = 128
    """Tokens per sequence."""


@dataclass
class GenerateConfig:
    prompt: str = "The "
    """Each generated line starts with this text."""
    lines: int = 3
    max_new_tokens: int = 100
    temperature: float = 0.8


@dataclass
class HFAppConfig(TrainConfig):
    """examples/finetune_hf.py: a transformers causal LM trained through the pipeline."""

    model: HFModelConfig = field(default_factory=HFModelConfig)
    data: HFDataConfig = field(default_factory=HFDataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    save_dir: str = "hf_model"
    """Where hf.save_pretrained writes the trained model, relative to the run directory."""


ConfigStore.instance().store(name="finetune_hf_schema", node=HFAppConfig)


def tokenizer_for(path: str | None) -> Any:
    """The checkpoint's own tokenizer, else byte tokens (ByT5's tokenizer needs no vocabulary file)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if path is not None:
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            log.warning("%s has no tokenizer: using byte tokens", path)
    return ByT5Tokenizer(extra_ids=0)


def new_model_config(cfg: HFAppConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                       num_key_value_heads=m.num_kv_heads, max_position_embeddings=cfg.data.seq_len,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def token_ids(cfg: HFAppConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as token ids, split into training and held-out parts."""
    ids = torch.tensor(tokenizer(load_text(cfg.data.text), add_special_tokens=False, verbose=False)["input_ids"])
    cut = int(len(ids) * (1 - cfg.data.val_fraction))
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, count: int, cfg: HFAppConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` micro-batches of random windows: (input_ids, labels) with labels = input_ids
    (transformers' loss shifts them), the same in every process for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    size, length = cfg.data.micro_batch_size, cfg.data.seq_len
    starts = torch.randint(0, len(ids) - length, (count, size), generator=gen)
    batch = ids[starts[..., None] + torch.arange(length)]  # (count, B, T)
    return [(b, b.clone()) for b in batch]


def build(cfg: HFAppConfig, tokenizer: Any) -> tuple[pg.PipelineEngine, pg.ProcessGroups]:
    """Join the job and build this rank's stages: from the checkpoint, or a new model."""
    groups = pg.init_distributed(cfg)
    m = cfg.model
    common = dict(topology=groups.topology, attn_implementation=m.attn_implementation, seed=cfg.train.seed,
                  activation_checkpoint_interval=m.activation_checkpoint_interval,
                  virtual_stages=cfg.schedule.virtual_stages, stage_placement=pg.stage_placement(cfg.schedule))
    if m.path:
        model = hf.from_pretrained(m.path, **common)
    else:
        model = hf.from_config(new_model_config(cfg, tokenizer), **common)
    if groups.rank == 0:
        total = sum(p.numel() for p in model.skeleton.shell.parameters())
        log.info("%s, %.2fM parameters, %s:\n%s", model.skeleton.plan.class_name, total / 1e6,
                 f"from {m.path}" if m.path else "new (random init)", model.describe())
    return pg.initialize(model, cfg, groups=groups), groups


def train(cfg: HFAppConfig, tokenizer: Any, train_ids: torch.Tensor, val_ids: torch.Tensor, out_dir: str) -> dict:
    """One rank: train, measure the held-out loss, save the model as a transformers checkpoint."""
    engine, groups = build(cfg, tokenizer)
    m, data, d = cfg.schedule.micro_batches, cfg.topology.data, groups.coord.data
    tokens = m * data * cfg.data.micro_batch_size * cfg.data.seq_len
    tic, loss = time.perf_counter(), math.nan
    for step in range(1, cfg.train.steps + 1):
        loss = engine.train_batch(iter(windows(train_ids, m * data, cfg, cfg.train.seed + step)[d * m:(d + 1) * m]))
        if groups.rank == 0 and (step % cfg.train.log_interval == 0 or step == cfg.train.steps):
            rate = tokens * step / (time.perf_counter() - tic)
            log.info("step %d/%d: loss %.4f, %.0f tokens/s", step, cfg.train.steps, loss, rate)
    val = sum(engine.eval_batch(iter(windows(val_ids, m * data, cfg, -1 - i)[d * m:(d + 1) * m]))
              for i in range(4)) / 4
    saved = hf.save_pretrained(engine, out_dir, tokenizer=tokenizer)
    if groups.rank == 0:
        log.info("held-out loss %.4f nats/token; saved %s with hf.save_pretrained", val, saved)
    result = {"loss": loss, "val_loss": val, "steps": engine.global_steps, "saved": saved}
    if cfg.generate.lines > 0:  # any layout, V and interleaved placements too (tests/dist/test_generate_layouts.py)
        result.update(generate_in_pipeline(cfg, engine, tokenizer, groups.rank == 0))
    return result


def _prompts(cfg: HFAppConfig, tokenizer: Any) -> dict[str, torch.Tensor]:
    return tokenizer([cfg.generate.prompt] * cfg.generate.lines, return_tensors="pt", add_special_tokens=False)


def generate_in_pipeline(cfg: HFAppConfig, engine: pg.PipelineEngine, tokenizer: Any, log_it: bool) -> dict:
    """engine.generate on the training layout, each stage with its own KV cache: sampled lines to
    read, and the greedy tokens the saved model must reproduce in plain transformers."""
    inputs = _prompts(cfg, tokenizer)
    sample = cfg.generate.temperature > 0
    out = engine.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=cfg.generate.max_new_tokens,
                          do_sample=sample, temperature=cfg.generate.temperature if sample else 1.0,
                          seed=cfg.train.seed, pad_token_id=tokenizer.pad_token_id)
    greedy = engine.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=cfg.generate.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    if log_it:
        lines = [text.replace("\n", " ") for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
        log.info("engine.generate through the pipeline (KV cache per stage) writes:\n%s",
                 "\n".join(f"  {line!r}" for line in lines))
    return {"pipeline_greedy": greedy}


def generate(cfg: HFAppConfig, directory: str) -> list[str]:
    """Plain transformers, one process: load what the pipeline saved and continue the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = _prompts(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    sample = cfg.generate.temperature > 0
    out = model.generate(**inputs, max_new_tokens=cfg.generate.max_new_tokens, do_sample=sample,
                         temperature=cfg.generate.temperature if sample else None, top_k=None, top_p=None,
                         pad_token_id=tokenizer.pad_token_id)
    return [text.replace("\n", " ") for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def check_greedy_round_trip(cfg: HFAppConfig, directory: str, pipeline_greedy: torch.Tensor) -> None:
    """The saved model, greedy in plain transformers, must write the pipeline's greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = _prompts(cfg, tokenizer)
    out = model.generate(**inputs, max_new_tokens=cfg.generate.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    if torch.equal(out, pipeline_greedy):
        log.info("greedy round trip: engine.generate and transformers' generate of the saved model write the same "
                 "%d tokens", out.numel())
    else:
        log.warning("greedy round trip: engine.generate and transformers' generate of the saved model differ "
                    "(expected only below float32, e.g. precision.dtype=bfloat16)")


@hydra_main("finetune_hf")
def main(config: DictConfig) -> float:
    """Check the config, train on every rank, then (rank 0) load the result with transformers and generate."""
    cfg = to_app_config(config, HFAppConfig, world_size=torchrun_world_size())
    if cfg.topology.tensor > 1:
        raise ValueError(f"examples/finetune_hf.py: topology.tensor={cfg.topology.tensor} is not supported by "
                         "pipegrid.hf; set topology.tensor=1")
    tokenizer = tokenizer_for(cfg.model.path)
    train_ids, val_ids = token_ids(cfg, tokenizer)
    out_dir = os.path.join(HydraConfig.get().runtime.output_dir, cfg.save_dir)
    result = launch(train, cfg, tokenizer, train_ids, val_ids, out_dir, world_size=cfg.topology.world_size,
                    backend=cfg.comm.backend)
    if int(os.environ.get("RANK", "0")) == 0 and cfg.generate.lines > 0:
        lines = generate(cfg, result["saved"])
        log.info("loaded %s with AutoModelForCausalLM.from_pretrained; it writes:\n%s", result["saved"],
                 "\n".join(f"  {line!r}" for line in lines))
        if "pipeline_greedy" in result:
            check_greedy_round_trip(cfg, result["saved"], result["pipeline_greedy"])
    return result["val_loss"]


if __name__ == "__main__":
    main()
