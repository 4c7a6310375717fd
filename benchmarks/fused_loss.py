"""Peak memory and time of the LM head + cross-entropy, forward and backward, plain (full logits)
against the fused loss chunked over tokens (``pipegrid.tensor.linear_cross_entropy``), side by side.

Each (vocabulary, system) pass runs in a fresh process, so its peak is its own: on CPU the
growth of the peak resident set (``ru_maxrss``) over the resident set once the inputs exist
(torch's CPU allocator returns large blocks to the OS, so the peak is what the pass held at
once); on CUDA ``torch.cuda.max_memory_allocated`` over the allocated bytes before the pass.
Rounds alternate the systems; the table gives medians.

    python benchmarks/fused_loss.py [--tokens 2048 --hidden 1024 --vocab 50257 128256 --rounds 3]
    python benchmarks/fused_loss.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("plain", "fused")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pass(args: argparse.Namespace) -> dict:
    """One forward + backward of one system in this (fresh) process: peak bytes over the inputs, seconds."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    from pipegrid.tensor import LMHeadInputs, linear_cross_entropy
    from pipegrid.tensor.linear_cross_entropy import available_kernel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab_one, args.hidden, device=device, dtype=dtype, generator=gen) * 0.02
              ).requires_grad_()
    labels = torch.randint(0, args.vocab_one, (args.tokens,), device=device, generator=gen)
    kernel = available_kernel(device) if args.system == "fused" else "-"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    if args.system == "plain":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    else:
        loss = linear_cross_entropy(LMHeadInputs(hidden, weight), labels, chunk_tokens=args.chunk_tokens,
                                    kernel=kernel)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "seconds": seconds, "loss": loss.item(), "kernel": kernel}


def _run_one(args: argparse.Namespace, vocab: int, system: str) -> dict:
    command = [sys.executable, __file__, "--one", "--system", system, "--vocab-one", str(vocab),
               "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk-tokens", str(args.chunk_tokens),
               "--device", args.device, "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_pass(args)))
        return
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    samples: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.rounds):
        for vocab in args.vocab:
            for system in SYSTEMS:  # alternating: each round runs both systems back to back
                samples.setdefault((vocab, system), []).append(_run_one(args, vocab, system))
    rows, table = _summarise(args, samples)
    print("\n".join(table))
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"fused_loss_{args.device}.json")
    sys.path.insert(0, ROOT)
    from benchmarks.record import write_record

    write_record(out, rows, table, device=args.device, dtype=args.dtype, tokens=args.tokens, hidden=args.hidden,
                 chunk_tokens=args.chunk_tokens, rounds=args.rounds, load_average=os.getloadavg()[0],
                 omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def _summarise(args: argparse.Namespace, samples: dict[tuple[int, str], list[dict]]) -> tuple[list[dict], list[str]]:
    rows, mib = [], 2 ** 20
    title = (f"head + cross-entropy fwd+bwd, {args.tokens} tokens x hidden {args.hidden}, {args.dtype} on "
             f"{args.device}, chunks of {args.chunk_tokens} tokens, median of {args.rounds} "
             f"(load {os.getloadavg()[0]:.1f})")
    table = [title,
             "| vocab | plain peak MiB | fused peak MiB | saved | plain s | fused s | fused/plain time | kernel |",
             "|---|---|---|---|---|---|---|---|"]
    for vocab in args.vocab:
        plain, fused = samples[(vocab, "plain")], samples[(vocab, "fused")]
        row = {"vocab": vocab, "kernel": fused[0]["kernel"],
               **{f"{name}_{key}": statistics.median(s[key] for s in runs)
                  for name, runs in (("plain", plain), ("fused", fused)) for key in ("peak_bytes", "seconds")},
               "loss_difference": abs(plain[0]["loss"] - fused[0]["loss"])}
        rows.append(row)
        table.append(f"| {vocab} | {row['plain_peak_bytes'] / mib:.0f} | {row['fused_peak_bytes'] / mib:.0f} | "
                     f"{row['plain_peak_bytes'] / max(row['fused_peak_bytes'], 1):.1f}x | {row['plain_seconds']:.2f} | "
                     f"{row['fused_seconds']:.2f} | {row['fused_seconds'] / row['plain_seconds']:.2f} | {row['kernel']} |")
    return rows, table


if __name__ == "__main__":
    main()
