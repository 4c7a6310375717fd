"""Pack/unpack bandwidth of pipegrid's flat buffers against torch.cat and friends.

Times packing and unpacking 10, 100 and 1000 fp32 tensors of mixed (log-uniform)
sizes, 1 MB up to 1 GB in all on CUDA (256 MB on CPU), for every available path,
and reports GB/s (bytes read + written) and the fraction of the device's copy
bandwidth, measured as one large ``dst.copy_(src)``. On CUDA with CuPy, ``pipegrid/auto``
is what ``kernels.backend=auto`` does: per direction and size class, the path (torch or
CuPy) it measured faster on first use; the JSON lists those choices. Prints a markdown
table and writes JSON.

    python benchmarks/kernel_bandwidth.py --quick                  # CPU smoke run, ~1 minute
    python benchmarks/kernel_bandwidth.py --device cuda            # full GPU run
    python benchmarks/kernel_bandwidth.py --host                   # host time per call only

Unless ``--no-host``, the JSON also holds ``host``: what packing and unpacking 1000 small
tensors costs the host per call, whole calls and phases (``benchmarks/kernel_host_cost.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipegrid.kernels import FlatBuffer, FlatLayout  # noqa: E402
from pipegrid.kernels.backend import cupy_unavailable_reason  # noqa: E402
from pipegrid.kernels.path_choice import process_choice  # noqa: E402

import kernel_host_cost  # noqa: E402  (benchmarks/, beside this file: sys.path[1] when run as a script)
from kernel_host_cost import mixed_sizes  # noqa: E402

MB = 1 << 20


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds per call over ``repeats`` samples of enough calls to last ~10 ms.

    CUDA events time the GPU stream; on CPU, perf_counter. Batching calls per sample
    keeps timer and scheduler noise (shared machines) out of microsecond-scale calls.
    """
    def sample(fn: Callable[[], object], calls: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls

    def measure(fn: Callable[[], object]) -> float:
        first = sample(fn, 1)  # warm up: compiles kernels, fills caches
        calls = max(1, min(1000, int(0.01 / max(sample(fn, 1), first * 0.5, 1e-7))))
        return statistics.median(sample(fn, calls) for _ in range(repeats))
    return measure


def copy_bandwidth(device: torch.device, nbytes: int, measure) -> float:
    """GB/s of one large device copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / measure(lambda: dst.copy_(src)) / 1e9


def _pack_methods(tensors, backends) -> dict[str, Callable[[], object]]:
    methods = {
        "torch.cat": lambda: torch.cat([t.view(-1) for t in tensors]),
        "_flatten_dense_tensors": lambda: torch._utils._flatten_dense_tensors(tensors),
    }
    for backend in backends:
        buffer = FlatBuffer.from_tensors(tensors, backend=backend)
        methods[f"pipegrid/{backend}"] = lambda buffer=buffer: buffer.pack_from(tensors)
    return methods


def _unpack_methods(tensors, backends) -> dict[str, Callable[[], object]]:
    flat = torch._utils._flatten_dense_tensors(tensors)
    outs = [torch.empty_like(t) for t in tensors]
    sizes = [t.numel() for t in tensors]

    def split_copy() -> None:  # what DDP-style code does: unflatten views, then copy_
        for out, part in zip(outs, torch._utils._unflatten_dense_tensors(flat, outs)):
            out.copy_(part)

    methods = {
        "split+copy_": split_copy,
        "split_with_sizes_copy": lambda: torch.split_with_sizes_copy(
            flat, sizes, out=[o.view(-1) for o in outs]),
    }
    for backend in backends:
        buffer = FlatBuffer(FlatLayout.from_tensors(tensors), tensors[0].device, backend=backend)
        buffer.pack_from(tensors)
        methods[f"pipegrid/{backend}"] = lambda buffer=buffer: buffer.unpack_to(outs)
    return methods


def run(device: torch.device, counts, totals, repeats: int) -> dict:
    measure = _timer(device, repeats)
    # auto: each direction and size class takes the path it measured faster (pipegrid/kernels/path_choice.py)
    backends = ["torch"] + (["cupy", "auto"] if device.type == "cuda" and cupy_unavailable_reason() is None else [])
    copy_gbs = copy_bandwidth(device, max(totals), measure)
    rows = []
    for total in totals:
        for count in counts:
            tensors = [torch.randn(n, device=device) for n in mixed_sizes(count, total, seed=count)]
            payload = sum(t.numel() for t in tensors) * 4
            for op, methods in (("pack", _pack_methods(tensors, backends)),
                                ("unpack", _unpack_methods(tensors, backends))):
                baseline = None
                for name, fn in methods.items():
                    seconds = measure(fn)
                    baseline = baseline or seconds
                    gbs = 2 * payload / seconds / 1e9
                    rows.append(dict(op=op, tensors=count, total_mb=round(payload / MB, 2), method=name,
                                     time_us=round(seconds * 1e6, 1), gb_s=round(gbs, 2),
                                     copy_fraction=round(gbs / copy_gbs, 3),
                                     speedup_vs_first=round(baseline / seconds, 2)))
            del tensors
    choices = [dataclasses.asdict(m) for m in process_choice().table()]
    return dict(device=_device_name(device), backends=backends, copy_gb_s=round(copy_gbs, 2), rows=rows,
                auto_choices=choices)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}; copy bandwidth {result['copy_gb_s']} GB/s (read + write)",
             "", "| op | tensors | MB | method | time (us) | GB/s | of copy bw | vs first |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['tensors']} | {r['total_mb']} | {r['method']} | {r['time_us']} "
                     f"| {r['gb_s']} | {r['copy_fraction']:.0%} | {r['speedup_vs_first']}x |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1 and 16 MB only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernel_bandwidth_<device>.json)")
    parser.add_argument("--host", action="store_true",
                        help="only the host time per call of 1000 small tensors (benchmarks/kernel_host_cost.py)")
    parser.add_argument("--no-host", action="store_true", help="leave the host-time table out")
    args = parser.parse_args(argv)
    if args.host:
        kernel_host_cost.main(["--device", args.device] + (["--out", str(args.out)] if args.out else []))
        return
    device = torch.device(args.device)
    cap = 1024 * MB if device.type == "cuda" else 256 * MB
    totals = [MB, 16 * MB] if args.quick else [t for t in (MB, 16 * MB, 256 * MB, 1024 * MB) if t <= cap]
    repeats = args.repeats or (5 if args.quick else 20)
    result = run(device, (10, 100, 1000), totals, repeats)
    result.update(command=" ".join(["python", "benchmarks/kernel_bandwidth.py", *(argv or sys.argv[1:])]),
                  torch=torch.__version__, commit=_commit(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    print(markdown(result))
    out = args.out or Path(__file__).parent / "results" / f"kernel_bandwidth_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")  # first without the host table: a step limit keeps this
    if not args.no_host:  # what the 1000-tensor rows cost the host, call by call and phase by phase
        result["host"] = kernel_host_cost.measure(args.device, samples=3 if args.quick else 5)
        print("\n" + kernel_host_cost.markdown(result["host"]))
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
