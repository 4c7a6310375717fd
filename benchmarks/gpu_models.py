"""Transformers models on one GPU (pipe=1): plain bf16 loops against pipegrid, side by side.

GPT-2 124M and a Llama-shaped 1.1B, built from their configs (no download), trained by

  plain eager            AutoModelForCausalLM in bf16, AdamW, clip 1.0 (the usual loop)
  plain compiled         the same model under one ``torch.compile``
  pipegrid eager         ``pipegrid.hf.from_config``, ``precision=bf16`` (fp32 master weights)
  pipegrid compiled      ... ``compile.enabled=true``
  pipegrid compiled+fp8  ... ``compile.enabled=true precision.fp8=true``
                         (and ``pipegrid eager+fp8`` where this pipegrid has no ``compile.*`` yet)

in one process. Each system is built and warmed up (compiled) alone, which is when its
own peak memory is taken; then the systems take turns, round after round, and tokens/s
is the median over rounds. MFU counts 6 N + 12 L d T FLOPs per token (N every
parameter, T the sequence length) against 989 TFLOP/s (H100/H200 dense bf16). Every
system trains on the same learnable batches in the same order, so the loss curves
compare; the fp8 gap is fp8's loss against bf16's (compiled, else eager), step by step.

A system that cannot run here is skipped, not failed, saying why: a config key this
pipegrid lacks (``compile.*`` before it lands), fp8 refused (no torchao, CPU, below
sm_89). ``--set key=value`` passes further overrides to the pipegrid systems (e.g. a fused
loss). The run stops starting work after ``--budget-s`` and writes its JSON after every
system, so what was measured survives a time limit.

    python benchmarks/gpu_models.py --out $OUT/models_cuda.json                 # one H200: ~4 min
    python benchmarks/gpu_models.py --cpu --out /tmp/models_cpu.json            # tiny, on the CPU
    python benchmarks/gpu_models.py --set compile.mode=max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # no module here hides a package
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
import yaml  # noqa: E402

import pipegrid as pg  # noqa: E402
from pipegrid.conf.schema import to_train_config  # noqa: E402

PEAK_FLOPS = 989e12
LR = 3e-4
SYSTEMS = ("plain eager", "plain compiled", "pipegrid eager", "pipegrid compiled", "pipegrid compiled+fp8")
# shapes as in issue 27's table: 4 micro-batches per step
MODELS = {
    "llama-1.1b": {"family": "llama", "micro_batch": 1, "seq": 2048, "micro_batches": 4,
                   "config": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                              "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                              "max_position_embeddings": 2048, "tie_word_embeddings": False}},
    "gpt2-124m": {"family": "gpt2", "micro_batch": 4, "seq": 1024, "micro_batches": 4,
                  "config": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}},
}
TINY = {
    "llama-tiny": {"family": "llama", "micro_batch": 2, "seq": 32, "micro_batches": 2,
                   "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                              "max_position_embeddings": 64, "tie_word_embeddings": False}},
    "gpt2-tiny": {"family": "gpt2", "micro_batch": 2, "seq": 32, "micro_batches": 2,
                  "config": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 64,
                             "bos_token_id": 255, "eos_token_id": 255}},
}
# today's pipegrid bf16 peak memory at these settings (issue 27, H200): the memory must-be-true
TODAY_PEAK_GIB = {"llama-1.1b": 36.5, "gpt2-124m": 19.3}


class Skipped(Exception):
    """This system cannot run here (a missing config key, fp8 refused): reported, not failed."""


def hf_config(spec: dict) -> Any:
    from transformers import GPT2Config, LlamaConfig

    return (LlamaConfig if spec["family"] == "llama" else GPT2Config)(**spec["config"])


def batches(spec: dict, device: torch.device, count: int = 8) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` steps of micro-batches of learnable sequences: token t = (a + s t) mod vocab."""
    vocab, seq = hf_config(spec).vocab_size, spec["seq"]
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(count):
        step = []
        for _ in range(spec["micro_batches"]):
            start = torch.randint(0, vocab, (spec["micro_batch"], 1), generator=gen)
            stride = torch.randint(1, 8, (spec["micro_batch"], 1), generator=gen)
            ids = ((start + stride * torch.arange(seq)) % vocab).to(device)  # (B, T)
            step.append((ids, ids))  # labels = inputs: the model shifts them
        steps.append(step)
    return steps


class PlainLoop:
    """The loop a transformers user writes: bf16 weights, fused AdamW, clip 1.0."""

    def __init__(self, spec: dict, device: torch.device, compiled: bool, compile_backend: str) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config(spec), attn_implementation="sdpa")
        self.model = model.to(torch.bfloat16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = torch.compile(model, backend=compile_backend) if compiled else model
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, fused=device.type == "cuda")
        self.device = device

    def step(self, batch: list) -> float:
        total = torch.zeros((), device=self.device)
        for ids, labels in batch:
            loss = self.forward(input_ids=ids, labels=labels).loss
            (loss / len(batch)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (total / len(batch)).item()


def _nested(overrides: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


class PipegridRun:
    """pipegrid at pipe=1 on the same model; ``overrides`` are dotted config keys."""

    def __init__(self, spec: dict, overrides: dict[str, Any]) -> None:
        from pipegrid import hf

        base = {"topology": {"pipe": 1}, "schedule": {"name": "1f1b", "micro_batches": spec["micro_batches"]},
                "optimizer": {"_target_": "torch.optim.AdamW", "lr": LR}, "precision": {"dtype": "bfloat16"},
                "train": {"grad_clip": 1.0}}
        config = _merge(base, _nested(overrides))
        try:
            to_train_config(config)
        except (ValueError, TypeError, KeyError) as error:  # a key this pipegrid does not have yet
            raise Skipped(f"config refused: {str(error).split(';')[0][:160]}") from error
        model = hf.from_config(hf_config(spec), topology=pg.Topology(pipe=1), dtype=torch.bfloat16,
                               attn_implementation="sdpa")
        try:
            self.engine = pg.initialize(model, config)
        except (RuntimeError, ValueError) as error:
            if "fp8" in str(error):  # refused before any process group, naming why
                raise Skipped(str(error).splitlines()[0][:200]) from error
            raise
        self.params = self.engine.params
        if overrides.get("precision.fp8") and not any(type(m).__name__ == "Float8Linear"
                                                      for m in self.engine.module.modules()):
            raise Skipped("precision.fp8 converted no layer: this model has no nn.Linear torchao can take "
                          "(transformers' GPT-2 uses Conv1D)")

    def step(self, batch: list) -> float:
        return self.engine.train_batch(iter(batch))


def build(name: str, spec: dict, device: torch.device, args: argparse.Namespace) -> PlainLoop | PipegridRun:
    compile_backend = "eager" if args.cpu else "inductor"  # --cpu: the plumbing, without minutes of C++
    if name.startswith("plain"):
        return PlainLoop(spec, device, name == "plain compiled", compile_backend)
    overrides = dict(args.set)
    if "compiled" in name:
        overrides["compile.enabled"] = True
        if args.cpu:
            overrides.setdefault("compile.backend", compile_backend)
    if name.endswith("+fp8"):
        overrides["precision.fp8"] = True
    return PipegridRun(spec, overrides)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelRun:
    """Every system on one model: build and warm up each alone, then alternating timed rounds."""

    def __init__(self, name: str, spec: dict, device: torch.device, args: argparse.Namespace) -> None:
        self.name, self.spec, self.device, self.args = name, spec, device, args
        self.steps = batches(spec, device)
        self.systems: dict[str, Any] = {}
        self.rows = {s: {"system": s, "status": "skip", "note": "not reached", "losses": []} for s in args.systems}
        self.tokens_per_step = spec["micro_batch"] * spec["seq"] * spec["micro_batches"]
        self.n_params: int | None = None

    def _run_steps(self, name: str, count: int) -> float:
        system, row = self.systems[name], self.rows[name]
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(count):
            row["losses"].append(system.step(self.steps[len(row["losses"]) % len(self.steps)]))
        _sync(self.device)
        return time.perf_counter() - start

    def warm(self, name: str) -> None:
        """Build ``name`` and run its warm-up steps alone: compile time and its own peak memory."""
        row, cuda = self.rows[name], self.device.type == "cuda"
        _free(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device) if cuda else 0
        start = time.perf_counter()
        try:
            self.systems[name] = build(name, self.spec, self.device, self.args)
            self.n_params = self.n_params or sum(p.numel() for p in self.systems[name].params)
            self._run_steps(name, self.args.warmup)
        except Skipped as why:
            self.systems.pop(name, None)
            row.update(status="skip", note=str(why))
            return
        except Exception as error:  # noqa: BLE001  one system's failure (OOM, compile) must not hide the others
            self.systems.pop(name, None)
            row.update(status="fail", note=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            return
        row.update(status="pass", note="", warmup_s=round(time.perf_counter() - start, 1), round_s=[],
                   peak_gib=round((torch.cuda.max_memory_allocated(self.device) - base) / 2**30, 2) if cuda else None)

    def rounds(self, deadline: float) -> None:
        for _ in range(self.args.rounds):
            for name in list(self.systems):
                if time.monotonic() > deadline:
                    return
                self.rows[name]["round_s"].append(self._run_steps(name, self.args.steps))

    def result(self, final: bool = True) -> dict:
        """The model's rows so far; ``final=False`` for a partial write while systems are still warming."""
        cfg = hf_config(self.spec)
        layers, width = cfg.num_hidden_layers, cfg.hidden_size
        flops = 6 * (self.n_params or 0) + 12 * layers * width * self.spec["seq"]  # per token
        rows = []
        for row in map(dict, self.rows.values()):
            if row.get("round_s"):
                row["tokens_per_s"] = round(self.tokens_per_step * self.args.steps / statistics.median(row["round_s"]))
                row["mfu"] = round(row["tokens_per_s"] * flops / PEAK_FLOPS, 4)
            elif row["status"] == "pass" and final:
                row.update(status="skip", note="time budget: built but never timed")
            rows.append(row)
        return {"model": self.name, "params": self.n_params, "tokens_per_step": self.tokens_per_step,
                "flops_per_token": flops, "systems": rows, "fp8_loss_gap": self.fp8_gap(),
                "today_peak_gib": TODAY_PEAK_GIB.get(self.name)}

    def fp8_gap(self) -> dict | None:
        """fp8's loss against bf16's, step by step: compiled against compiled, else eager against eager."""
        pairs = (("pipegrid compiled+fp8", "pipegrid compiled"), ("pipegrid eager+fp8", "pipegrid eager"))
        found = next(((f, b) for f, b in pairs if self.rows.get(f, {}).get("losses") and self.rows[b]["losses"]), None)
        if found is None:
            return None
        fp8, bf16_name = self.rows[found[0]]["losses"], found[1]
        bf16 = self.rows[bf16_name]["losses"]
        shared = min(len(fp8), len(bf16))
        gaps = [abs(a - b) / abs(b) for a, b in zip(fp8[:shared], bf16[:shared])]
        return {"against": bf16_name, "steps": shared, "max_rel": round(max(gaps), 4),
                "final_rel": round(gaps[-1], 4), "final_fp8": fp8[shared - 1], "final_bf16": bf16[shared - 1]}

    def close(self) -> None:
        self.systems.clear()
        _free(self.device)


def run(args: argparse.Namespace, device: torch.device, out: Path) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    table = TINY if args.cpu else MODELS
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_tflops": PEAK_FLOPS / 1e12, "budget_s": args.budget_s,
              "overrides": args.set, "models": []}
    names = args.models or (["llama-tiny"] if args.cpu else list(table))  # --cpu: one is plumbing enough
    if importlib.util.find_spec("transformers") is None:  # skipped, saying why: nothing here can run
        note = "transformers is not installed: pip install 'pipegrid[hf]' (or carry its wheels)"
        result["models"] = [{"model": n, "systems": [{"system": s, "status": "skip", "note": note, "losses": []}
                                                     for s in args.systems]} for n in names]
        _write(out, result)
        return result
    for name in names:
        model = ModelRun(name, table[name], device, args)
        for system in args.systems:
            if time.monotonic() > deadline:
                model.rows[system]["note"] = "time budget"
                continue
            model.warm(system)
            if system == "pipegrid compiled+fp8" and model.rows[system]["note"].startswith("config refused"):
                # compile.* not here yet: fp8 eager still says whether fp8 runs and tracks bf16
                model.rows["pipegrid eager+fp8"] = {"system": "pipegrid eager+fp8", "status": "skip", "note": "",
                                                     "losses": []}
                model.warm("pipegrid eager+fp8")
            _write(out, {**result, "models": [*result["models"], model.result(final=False)]})  # survives a limit
        model.rounds(deadline)
        result["models"].append(model.result())
        model.close()
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        _write(out, result)
    return result


def _write(out: Path, result: dict) -> None:
    """The JSON, with its markdown table in "table" (gpu_report.py prints it as it is)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "table": markdown(result)}, indent=2) + "\n")


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}; MFU against {result['peak_tflops']:g} TFLOP/s", "",
             "| model | system | tokens/s | MFU | peak GiB | vs plain compiled | final loss | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for model in result["models"]:
        rows = {r["system"]: r for r in model["systems"]}
        base = rows.get("plain compiled", {}).get("tokens_per_s")
        for r in model["systems"]:
            tps, mfu, peak = r.get("tokens_per_s"), r.get("mfu"), r.get("peak_gib")
            ratio = f"{tps / base:.2f}x" if tps and base else ""
            loss = f"{r['losses'][-1]:.3f}" if r["losses"] else ""
            status = r["status"] + (f": {r['note']}" if r.get("note") else "")
            lines.append(f"| {model['model']} | {r['system']} | {'' if tps is None else f'{tps:,}'} "
                         f"| {'' if mfu is None else f'{mfu:.1%}'} | {'' if peak is None else peak} | {ratio} "
                         f"| {loss} | {status.replace('|', '/')} |")
        gap = model.get("fp8_loss_gap")
        if gap:
            lines.append(f"| {model['model']} | fp8 vs {gap['against']} loss | | | | | "
                         f"max {gap['max_rel']:.2%}, final {gap['final_rel']:.2%} over {gap['steps']} steps | |")
    return "\n".join(lines)


def _parse_set(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes key=value (e.g. compile.mode=max-autotune), got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (the plumbing; seconds)")
    parser.add_argument("--models", nargs="*", choices=[*MODELS, *TINY],
                        help=f"default: {', '.join(MODELS)} (--cpu: llama-tiny)")
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--set", action="append", type=_parse_set, default=[], metavar="KEY=VALUE",
                        help="a pipegrid config override for the pipegrid systems (repeat)")
    parser.add_argument("--warmup", type=int, default=None, help="steps per system before timing (default 3; --cpu 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --cpu 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 5; --cpu 1)")
    parser.add_argument("--budget-s", type=float, default=None, help="start nothing new after this (default 250)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for key, gpu, cpu in (("warmup", 3, 1), ("rounds", 3, 2), ("steps", 5, 1), ("budget_s", 250.0, 120.0)):
        if getattr(args, key) is None:
            setattr(args, key, cpu if args.cpu else gpu)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the tiny CPU check")
    args.set = dict(args.set)
    device = torch.device("cpu" if args.cpu else "cuda", None if args.cpu else torch.cuda.current_device())
    out = args.out or Path(__file__).parent / "results" / f"models_{device.type}.json"
    try:
        result = run(args, device, out)
    finally:  # pipegrid leaves the process group to its owner at exit: this script owns it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0 if all(r["status"] != "fail" for m in result["models"] for r in m["systems"]) else 1


if __name__ == "__main__":
    sys.exit(main())
