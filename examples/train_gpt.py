"""Train a character-level GPT through a pipeline on Python's own documentation text.

    python examples/train_gpt.py                                  # 2 local workers (topology=pipe2)
    python examples/train_gpt.py schedule=gpipe topology=pipe4 train.steps=100
    python examples/train_gpt.py -m schedule=gpipe,1f1b topology=pipe2,pipe4
    torchrun --nproc-per-node 8 examples/train_gpt.py topology.pipe=4 topology.data=2

Not under torchrun, the script starts the topology's processes itself. It prints
falling loss and tokens/s, the validation loss against the text's unigram entropy,
and a sample generated through the pipeline; metrics go to ``metrics.csv`` in the
Hydra output directory (and TensorBoard when installed).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` and, uninstalled, pipegrid

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import pipegrid as pg
from examples.data import Corpus, char_corpus, load_text, random_windows
from examples.models.gpt import GPT, GPTConfig
from pipegrid.conf.apps import GPTAppConfig
from pipegrid.conf.checks import to_app_config
from pipegrid.launch import hydra_main, launch, torchrun_world_size
from pipegrid.tensor import gather_from_region

log = logging.getLogger("train_gpt")

# dense peak FLOP/s per GPU for MFU: (16-bit tensor cores, float32 without TF32)
_PEAK_FLOPS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}


class Progress:
    """Rank 0's view of training: progress bar, log lines, metrics CSV (and TensorBoard if installed)."""

    def __init__(self, cfg: GPTAppConfig, engine: pg.PipelineEngine, start: int, csv_path: str | None) -> None:
        self.cfg, self.engine, self.on = cfg, engine, csv_path is not None
        self.tokens_per_step = (cfg.topology.data * cfg.schedule.micro_batches * cfg.data.micro_batch_size
                                * cfg.model.seq_len)
        self.peak = peak_flops(engine, cfg)
        self.bar = tqdm(total=cfg.train.steps, initial=start, disable=not self.on, desc="train", unit="step")
        self.began = self.last_log = time.perf_counter()
        self.last_log_step = start
        self.file = open(csv_path, "a", newline="") if csv_path else None  # noqa: SIM115 - see close()
        self.csv = csv.writer(self.file) if self.file else None
        if self.csv and self.file.tell() == 0:
            self.csv.writerow(["step", "loss", "val_loss", "tokens_per_s", "lr", "elapsed_s", "mfu"])
        self.board = _tensorboard(csv_path)

    def step(self, step: int, loss: float, seconds: float, val: float | None) -> None:
        tokens_per_s = self.tokens_per_step / seconds
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        mfu = self.engine.module.estimate_mfu(tokens_per_s, self.peak) if self.peak else None
        if mfu is not None:
            postfix["mfu"] = f"{mfu:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update()
        if not self.on:
            return
        values = {"loss": loss, "val_loss": val, "tokens_per_s": tokens_per_s,
                  "lr": self.engine.optimizer.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - self.began,
                  "mfu": mfu}
        self.csv.writerow([step, *("" if v is None else f"{v:.6g}" for v in values.values())])
        self.file.flush()
        for key, value in values.items():
            if self.board and value is not None:
                self.board.add_scalar(key, value, step)
        if step % self.cfg.train.log_interval == 0 or val is not None:
            now = time.perf_counter()
            rate = self.tokens_per_step * (step - self.last_log_step) / (now - self.last_log)
            self.last_log, self.last_log_step = now, step
            log.info("step %d/%d: loss %.4f%s, %.0f tokens/s%s", step, self.cfg.train.steps, loss,
                     "" if val is None else f", validation loss {val:.4f}", rate,
                     "" if mfu is None else f", MFU {mfu:.1%}")

    def close(self) -> None:
        self.bar.close()
        for handle in (self.file, self.board):
            if handle is not None:
                handle.close()


def _tensorboard(csv_path: str | None) -> Any:
    if csv_path is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(Path(csv_path).parent / "tensorboard"))


def step_batches(ids: torch.Tensor, cfg: GPTAppConfig, seed: int, data_rank: int) -> list:
    """This data rank's micro-batches of the global batch drawn with ``seed`` (the same on every stage)."""
    m, topo = cfg.schedule.micro_batches, cfg.topology
    batches = random_windows(ids, m * topo.data, cfg.data.micro_batch_size, cfg.model.seq_len, seed)
    return batches[data_rank * m:(data_rank + 1) * m]


def validation_loss(engine: pg.PipelineEngine, corpus: Corpus, cfg: GPTAppConfig, data_rank: int) -> float:
    """Mean loss over a fixed set of held-out batches (the same at every evaluation)."""
    losses = [engine.eval_batch(iter(step_batches(corpus.val, cfg, -1 - i, data_rank)))
              for i in range(cfg.eval.batches)]
    return sum(losses) / len(losses)


def peak_flops(engine: pg.PipelineEngine, cfg: GPTAppConfig) -> float | None:
    """Peak FLOP/s of all the GPUs in the job, when this is a GPU we know; None on CPU."""
    if engine.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(engine.device)
    for key, (half, single) in _PEAK_FLOPS.items():
        if key in name:
            per_gpu = single if cfg.precision.dtype == "float32" else half
            return per_gpu * dist.get_world_size()
    return None


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): the most likely ones, or draws at ``temperature``."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)[:, 0]


def prompt(corpus: Corpus, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` held-out characters that end a sentence (". "), so the sample starts one."""
    text = corpus.decode(corpus.val[:20_000])
    found = text.find(". ", seq_len)
    end = found + 2 if found >= 0 else seq_len
    return corpus.val[end - seq_len:end]


@torch.no_grad()
def sample(engine: pg.PipelineEngine, groups: pg.ProcessGroups, corpus: Corpus, cfg: GPTAppConfig) -> str:
    """Continue a held-out prompt with ``engine.generate``: each stage keeps its KV cache, so a
    new character costs one token's forward, not a whole window's.

    The model has ``seq_len`` learned positions: the text is written in chunks, each
    continuing the last ``seq_len // 2`` characters with up to ``seq_len // 2 + 1`` new ones.
    Any layout training runs (pipe, tensor, chunks per rank) generates where it trained;
    ``sample_full_pass`` is the cacheless baseline benchmarks/generate.py compares with.
    """
    keep = cfg.model.seq_len // 2
    text = prompt(corpus, keep)[None]  # (1, keep)
    chunk = 0
    while text.shape[1] - keep < cfg.sample.length:
        new = min(cfg.model.seq_len - keep + 1, cfg.sample.length - (text.shape[1] - keep))
        out = engine.generate(text[:, -keep:], max_new_tokens=new, do_sample=cfg.sample.temperature > 0,
                              temperature=cfg.sample.temperature or 1.0, seed=cfg.train.seed + chunk)
        text = torch.cat([text, out[:, keep:]], dim=1)
        chunk += 1
    return corpus.decode(text[0, keep:])


@torch.no_grad()
def sample_full_pass(engine: pg.PipelineEngine, groups: pg.ProcessGroups, corpus: Corpus, cfg: GPTAppConfig) -> str:
    """Continue a held-out prompt of ``seq_len`` characters, one pipeline forward per character.

    The pipeline runs the training shapes, so each forward carries micro_batch_size
    windows (B independent samples; the first is returned). The last stage picks the
    next characters and broadcasts them; every rank then slides its windows by one.
    """
    topo, seq_len, batch = groups.topology, cfg.model.seq_len, cfg.data.micro_batch_size
    source = topo.rank(pipe=topo.pipe - 1, data=0, tensor=0)
    context = prompt(corpus, seq_len).to(engine.device).repeat(batch, 1)  # (B, T)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for _ in range(cfg.sample.length):
        window = context[:, -seq_len:]  # (B, T)
        _, outputs = engine.eval_batch(iter([(window, window)] * cfg.schedule.micro_batches),
                                       return_outputs=True)
        tokens = torch.zeros(batch, dtype=torch.long, device=engine.device)
        if outputs:  # the last stage: logits (B, T, V / tensor)
            logits = outputs[0][:, -1]  # (B, V / tensor)
            if topo.tensor > 1:
                logits = gather_from_region(logits, groups.tensor_parallel_group)  # (B, V)
            logits = logits.float().cpu()[:, :len(corpus.chars)]  # padded ids never occur
            tokens = _pick(logits, cfg.sample.temperature, gen).to(tokens)
        dist.broadcast(tokens, src=source)
        context = torch.cat([context, tokens[:, None]], dim=1)
    return corpus.decode(context[0, seq_len:].cpu())


def build(cfg: GPTAppConfig) -> tuple[pg.PipelineEngine, pg.ProcessGroups, Corpus]:
    """Join the job, load the text and build this rank's stage of the GPT and its engine."""
    groups = pg.init_distributed(cfg)
    coord = groups.coord  # dropout: tensor-parallel peers must draw the same masks, other ranks not
    torch.manual_seed(cfg.train.seed + coord.pipe * groups.topology.data + coord.data)
    corpus = char_corpus(load_text(cfg.data.text), cfg.model.vocab_size, cfg.data.val_fraction)
    model = GPT(GPTConfig(**vars(cfg.model)), topology=groups.topology,
                tensor_group=groups.tensor_parallel_group, virtual_stages=cfg.schedule.virtual_stages,
                stage_placement=pg.stage_placement(cfg.schedule), seed=cfg.train.seed)
    return pg.initialize(model, cfg, groups=groups), groups, corpus


def train(cfg: GPTAppConfig, run_dir: str) -> dict[str, Any]:
    """One rank of the job: train, evaluate, sample. Rank 0 logs, shows progress and writes files."""
    engine, groups, corpus = build(cfg)
    rank0, data_rank = groups.rank == 0, groups.coord.data
    if rank0:
        log.info("%s | %d characters (%d distinct), %d held out", _describe(engine, cfg), len(corpus.train),
                 len(corpus.chars), len(corpus.val))
    start = _resume(engine, cfg)
    csv_path = os.path.join(run_dir, cfg.metrics_file) if rank0 and cfg.metrics_file else None
    progress = Progress(cfg, engine, start, csv_path)
    loss = math.nan
    try:  # a stop signal (train.save_on_signal) ends train_batch in pipegrid.Preempted: exit 0, resumable
        with logging_redirect_tqdm():
            for step in range(start + 1, cfg.train.steps + 1):
                tic = time.perf_counter()
                loss = engine.train_batch(iter(step_batches(corpus.train, cfg, cfg.train.seed + step, data_rank)))
                seconds = time.perf_counter() - tic
                val = None
                if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.train.steps:
                    val = validation_loss(engine, corpus, cfg, data_rank)
                progress.step(step, loss, seconds, val)
                _maybe_save(engine, cfg, step)
    finally:
        progress.close()
    if cfg.trace.enabled:  # the last training step's timeline (evaluation would replace it)
        _write_trace(engine, cfg.trace.path or os.path.join(run_dir, "trace.json"))
    return _finish(engine, groups, corpus, cfg, loss)


def _write_trace(engine: pg.PipelineEngine, path: str) -> None:
    """Collective: every rank's timeline to one Chrome trace (+ PNG); rank 0 reports the bubble."""
    bubble = engine.write_trace(path)
    if bubble is not None:  # rank 0
        log.info("trace of the last step in %s (open in https://ui.perfetto.dev): bubble measured %.1f%% vs "
                 "simulated %.1f%%", path, 100 * bubble["measured_bubble"], 100 * bubble["simulated_bubble"])


def _finish(engine: pg.PipelineEngine, groups: pg.ProcessGroups, corpus: Corpus, cfg: GPTAppConfig,
            loss: float) -> dict[str, Any]:
    """Final validation loss vs the unigram entropy, and the sample."""
    rank0 = groups.rank == 0
    val = validation_loss(engine, corpus, cfg, groups.coord.data)
    entropy = corpus.unigram_entropy()
    if rank0:
        log.info("validation loss %.4f nats/char (%.3f bits) vs unigram entropy %.4f nats/char (%.3f bits)",
                 val, val / math.log(2), entropy, entropy / math.log(2))
        memory = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in engine.memory_report().items() if v)
        log.info("memory of rank 0: %s", memory)
    sample_text = sample(engine, groups, corpus, cfg) if cfg.sample.length else ""
    if rank0 and sample_text:
        start = corpus.decode(prompt(corpus, cfg.model.seq_len // 2))
        log.info("sample, continuing the held-out text %r:\n%s", start, sample_text)
    return {"loss": loss, "val_loss": val, "unigram_entropy": entropy, "sample": sample_text,
            "steps": engine.global_steps}


def _describe(engine: pg.PipelineEngine, cfg: GPTAppConfig) -> str:
    params, topo = GPTConfig(**vars(cfg.model)).num_parameters(), cfg.topology
    return (f"GPT {params / 1e6:.2f}M parameters on pipe={topo.pipe} x data={topo.data} x tensor={topo.tensor} "
            f"{engine.device.type} ranks, {cfg.schedule.name} x {cfg.schedule.micro_batches} micro-batches, "
            f"{cfg.precision.dtype}")


def _resume(engine: pg.PipelineEngine, cfg: GPTAppConfig) -> int:
    """The step to continue after: initialize() already loaded checkpoint.dir's latest, if any."""
    if engine.global_steps and dist.get_rank() == 0:
        log.info("resumed from %s at step %d", cfg.checkpoint.dir, engine.global_steps)
    return engine.global_steps


def _maybe_save(engine: pg.PipelineEngine, cfg: GPTAppConfig, step: int) -> None:
    """The engine saves every checkpoint.interval steps itself; add the final step if it was not one."""
    every = cfg.checkpoint.interval
    if cfg.checkpoint.dir and step == cfg.train.steps and not (every and step % every == 0):
        engine.save_checkpoint(cfg.checkpoint.dir)


@hydra_main("gpt")
def main(config: DictConfig) -> float:
    """Check the whole config, then run ``train`` on every rank; the final validation loss."""
    cfg = to_app_config(config, GPTAppConfig, world_size=torchrun_world_size())
    result = launch(train, cfg, HydraConfig.get().runtime.output_dir, world_size=cfg.topology.world_size,
                    backend=cfg.comm.backend)
    return result["val_loss"]


if __name__ == "__main__":
    main()
