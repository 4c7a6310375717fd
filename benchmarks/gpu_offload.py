"""The largest Llama-shaped model that trains on one GPU with ZeRO-Offload: ``hf.from_config`` built
on the GPU in bf16, pipe=1, activation checkpointing every layer, zero.stage=1 with
zero.offload_optimizer=cpu (fp32 master weights, Adam moments and the gradient shard in pinned host
memory, the optimizer step on the CPU). Tries 8B-class first, then smaller; prints tokens/s, MFU and
peak device and host memory of each try.

A try is skipped when the host cannot hold its offloaded state (16 bytes per parameter: fp32
master, two Adam moments, the fp32 gradient) in the memory available now, and fails when the GPU
runs out; each runs in its own process (a host OOM kill ends that try only) within what is left
of ``--budget-s`` (180 s: build, one warm-up step, ``--steps`` timed steps).

    python benchmarks/gpu_offload.py [--budget-s 180] [--out benchmarks/results/gpu_offload.json]
    python benchmarks/gpu_offload.py --cpu      # a tiny Llama on the CPU over gloo (offload: a notice)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/ on sys.path would hide the `kernels` package transformers imports (benchmarks/kernels.py)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.dirname(HERE))

# Llama-3-shaped: (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {
    "8B": (4096, 14336, 32, 32, 8, 128256),
    "6B": (4096, 14336, 24, 32, 8, 128256),
    "3B": (3072, 8192, 28, 24, 8, 128256),
    "1B": (2048, 8192, 16, 32, 8, 128256),
}
TINY = {"tiny": (64, 128, 2, 4, 2, 256)}
HOST_BYTES_PER_PARAM = 16  # offloaded: fp32 master, Adam's two moments, the fp32 gradient shard
H200_BF16_FLOPS = 989e12  # dense peak, for MFU


def parameters(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    """A Llama's parameter count (untied embedding and head, no biases)."""
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def _host_available() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def train_one(name: str, cpu: bool, seq: int, micro_batch: int, micro_batches: int, steps: int) -> dict:
    """Build, warm up, time ``steps`` steps; tokens/s and peak memory (in this process)."""
    import torch
    from transformers import LlamaConfig

    import pipegrid as pg
    from pipegrid import hf

    hidden, ffn, layers, heads, kv_heads, vocab = {**SIZES, **TINY}[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    device = torch.device("cpu" if cpu else "cuda")
    start = time.perf_counter()
    with device:  # built where it trains: no host copy of the bf16 weights
        model = hf.from_config(config, topology=pg.Topology(pipe=1), dtype=torch.bfloat16,
                               activation_checkpoint_interval=1, attn_implementation="sdpa")
    engine = pg.initialize(model, {
        "topology": {"pipe": 1, "data": 1}, "comm": {"backend": "gloo" if cpu else "nccl"},
        "schedule": {"name": "1f1b", "micro_batches": micro_batches}, "precision": {"dtype": "bfloat16"},
        "zero": {"stage": 1, "offload_optimizer": "cpu"},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5}, "train": {"grad_clip": 1.0}})
    built_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    batches = [(ids, ids.clone()) for ids in (torch.randint(0, vocab, (micro_batch, seq), generator=gen)
                                               for _ in range(micro_batches))]
    loss = engine.train_batch(iter(batches))  # warm-up: the optimizer state is made here
    if not cpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = engine.train_batch(iter(batches))
    if not cpu:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    n = parameters(hidden, ffn, layers, heads, kv_heads, vocab)
    tokens_per_s = micro_batches * micro_batch * seq / step_s
    report = engine.memory_report()
    return {"size": name, "parameters": n, "status": "trained", "loss": loss, "build_s": built_s, "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "mfu": None if cpu else 8 * n * tokens_per_s / H200_BF16_FLOPS,  # 6N + recompute's 2N
            "peak_device_gib": 0.0 if cpu else torch.cuda.max_memory_allocated() / 2 ** 30,
            "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30,
            "host_state_gib": sum(v for k, v in report.items() if k.endswith("_host")) / 2 ** 30}


def _try(name: str, args: argparse.Namespace, left_s: float) -> dict:
    """One size in its own process, within ``left_s`` seconds."""
    hidden, ffn, layers, heads, kv_heads, vocab = {**SIZES, **TINY}[name]
    n = parameters(hidden, ffn, layers, heads, kv_heads, vocab)
    need, have = n * HOST_BYTES_PER_PARAM, _host_available()
    if not args.cpu and need * 1.05 > have:
        return {"size": name, "parameters": n, "status": f"skipped: offload needs {need / 2**30:.0f} GiB of host "
                f"memory, {have / 2**30:.0f} GiB available"}
    command = [sys.executable, os.path.abspath(__file__), "--one", name, "--seq", str(args.seq),
               "--micro-batch", str(args.micro_batch), "--micro-batches", str(args.micro_batches),
               "--steps", str(args.steps)] + (["--cpu"] if args.cpu else [])
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.cpu else {})}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(left_s, 1), env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"size": name, "parameters": n, "status": f"timed out after {left_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    status = "out of GPU memory" if "OutOfMemoryError" in done.stderr else f"failed: {tail[:200]}"
    return {"size": name, "parameters": n, "status": status}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="a tiny Llama on the CPU (the test's mode)")
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a try's own process
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.seq = args.seq or (32 if args.cpu else 4096)
    args.micro_batches = args.micro_batches or (2 if args.cpu else 4)
    args.steps = args.steps or (2 if args.cpu else 3)
    if args.one:
        print(json.dumps(train_one(args.one, args.cpu, args.seq, args.micro_batch, args.micro_batches, args.steps)))
        return 0
    deadline = time.monotonic() + args.budget_s
    rows = []
    for name in (TINY if args.cpu else SIZES):
        rows.append(_try(name, args, deadline - time.monotonic()))
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["status"] == "trained" or time.monotonic() >= deadline:
            break  # the largest that trains is the answer
    lines = ["| size | parameters | status | tokens/s | MFU | peak device GiB | peak host GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        trained = r["status"] == "trained"
        cells = [f"{r['tokens_per_s']:.0f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                 f"{r['peak_device_gib']:.1f}", f"{r['peak_host_gib']:.1f}"] if trained else ["-"] * 4
        size = f"{r['parameters'] / 1e9:.2f}B" if r["parameters"] >= 1e8 else f"{r['parameters'] / 1e6:.2f}M"
        lines.append(f"| {r['size']} | {size} | {r['status']} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        from benchmarks.record import write_record

        write_record(args.out, rows, lines, seq=args.seq, micro_batch=args.micro_batch,
                     micro_batches=args.micro_batches, steps=args.steps, device="cpu" if args.cpu else "cuda")
    return 0 if any(r["status"] == "trained" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
