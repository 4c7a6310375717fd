"""Host time per call of packing and unpacking 1000 small tensors: what a GPU waits on.

A fused kernel moves 1000 small tensors in microseconds; a call costs what the host does
around the launch: layout checks, tensor addresses, the segment table. This times whole
calls (pipegrid's paths and torch's baselines) and their phases, as the median host
microseconds per call (perf_counter over a batch of calls, no synchronisation inside it; on
CUDA "wall" also waits for the device at the end of each batch).

On a machine without CUDA the CuPy path still runs its host side: CuPy, the stream query
and the host-to-device copy are replaced by stand-ins that do nothing (``_stand_in_cuda``),
so ``FlatBuffer.pack_from`` with ``backend=cupy`` costs what it costs on a GPU host minus
CuPy's own launch (tens of microseconds) and the copy. ``--device cuda`` times the real path.
Each measurement runs in a worker process (the stand-ins never leak); ``--before DIR`` runs
another checkout's workers in alternating rounds and prints both, for before/after numbers.

    python benchmarks/kernel_host_cost.py                          # CPU: ~15 s a round
    python benchmarks/kernel_host_cost.py --before /tmp/before --rounds 5
    python benchmarks/kernel_host_cost.py --device cuda            # on a GPU (gpu_check runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

TREE = str(Path(__file__).resolve().parents[1])
MB = 1 << 20


def mixed_sizes(count: int, total_bytes: int, seed: int) -> list[int]:
    """``count`` log-uniform fp32 element counts (~400x spread) summing to about ``total_bytes``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(count, generator=gen, dtype=torch.float64) * 6)
    return (weights / weights.sum() * (total_bytes // 4)).floor().long().clamp(min=1).tolist()


def _stand_in_cuda() -> None:
    """Let ``pipegrid.kernels.cupy_kernels`` run its host side on CPU tensors (worker processes only).

    CuPy becomes a module whose contexts and kernels do nothing; torch's stream query, device
    properties and pinned copy answer as on a GPU without touching one.
    """
    import torch

    nothing = contextlib.nullcontext
    kernel = types.SimpleNamespace(get_function=lambda name: lambda grid, block, args: None)
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda *a: nothing(), using_allocator=lambda *a: nothing(),
                                      Stream=types.SimpleNamespace(from_external=lambda stream: nothing()))
    cupy.RawModule = lambda code: kernel
    sys.modules["cupy"] = cupy
    stream = types.SimpleNamespace(cuda_stream=0)
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.get_device_properties = lambda index: types.SimpleNamespace(multi_processor_count=132)
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _calls_per_batch(fn: Callable[[], object], sync: Callable[[], None], target_s: float) -> int:
    """Warm ``fn`` up and size a batch of calls to last about ``target_s``."""
    for _ in range(3):
        fn()
    sync()
    begin = time.perf_counter()
    fn()
    sync()
    return max(1, min(2000, int(target_s / max(time.perf_counter() - begin, 1e-7))))


def _batch(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(host, wall) seconds per call over one batch: host stops before the device is waited for."""
    sync()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - begin
    sync()
    return host / calls, (time.perf_counter() - begin) / calls


def _cases(device, count: int) -> dict[str, Callable[[], object]]:
    """Whole calls, by stable names (another checkout runs the same ones)."""
    import torch

    from pipegrid.kernels import FlatBuffer, FlatLayout, pack, unpack
    from pipegrid.kernels.backend import cupy_unavailable_reason

    tensors = [torch.randn(n, device=device) for n in mixed_sizes(count, MB, seed=count)]
    layout = FlatLayout.from_tensors(tensors)
    flat = pack(tensors, layout=layout, backend="torch")
    dense = torch._utils._flatten_dense_tensors(tensors)  # the baselines' buffer: no padding
    outs = [torch.empty_like(t) for t in tensors]
    sizes = [t.numel() for t in tensors]
    cases = {
        "pack: torch.cat": lambda: torch.cat([t.view(-1) for t in tensors]),
        "pack: _flatten_dense_tensors": lambda: torch._utils._flatten_dense_tensors(tensors),
        "pack: pack(tensors)": lambda: pack(tensors, backend="torch"),
        "pack: pack(tensors, layout)": lambda: pack(tensors, layout=layout, backend="torch"),
        "unpack: split+copy_": lambda: [o.copy_(p) for o, p in zip(outs, torch._utils._unflatten_dense_tensors(
            dense, outs), strict=True)],
        "unpack: split_with_sizes_copy": lambda: torch.split_with_sizes_copy(dense, sizes,
                                                                             out=[o.view(-1) for o in outs]),
        "unpack: unpack(flat, layout)": lambda: unpack(flat, layout, backend="torch"),
        "unpack: unpack(flat, layout, out)": lambda: unpack(flat, layout, out=outs, backend="torch"),
    }
    cast_layout = FlatLayout.from_tensors(tensors, dtype=torch.bfloat16)
    fused = device.type != "cuda" or cupy_unavailable_reason() is None
    for backend in ("torch", "cupy", "auto") if fused else ("torch",):
        if backend == "auto" and device.type != "cuda":
            continue  # auto on CPU tensors is the torch path
        buffer, cast = FlatBuffer(layout, device, backend="torch"), FlatBuffer(cast_layout, device, backend="torch")
        buffer.backend = cast.backend = backend  # on CPU: the CuPy path's host side, stand-ins below it
        cases[f"pack: FlatBuffer.pack_from/{backend}"] = lambda b=buffer: b.pack_from(tensors)
        cases[f"pack: FlatBuffer.pack_from bf16 x0.5/{backend}"] = lambda b=cast: b.pack_from(tensors, scale=0.5)
        cases[f"unpack: FlatBuffer.unpack_to/{backend}"] = lambda b=buffer: b.unpack_to(outs)
        if backend != "torch" and device.type == "cuda":  # the free functions (p2p messages) on the GPU
            cases[f"pack: pack(tensors, layout)/{backend}"] = lambda b=backend: pack(tensors, layout=layout,
                                                                                     backend=b)
            cases[f"unpack: unpack(flat, layout, out)/{backend}"] = lambda b=backend: unpack(flat, layout, out=outs,
                                                                                             backend=b)
    return cases


def worker(device_name: str, count: int, target_s: float, samples: int) -> dict[str, list[float]]:
    """One round in this process: {case: [host_us, wall_us]}."""
    import torch

    device = torch.device(device_name)
    if device.type != "cuda":
        _stand_in_cuda()
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = {**_cases(device, count), **_phases(device, count)}
    calls = {name: _calls_per_batch(fn, sync, target_s) for name, fn in cases.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(samples):  # case after case, then again: a busy moment of the machine hits them all
        for name, fn in cases.items():
            times[name].append(_batch(fn, calls[name], sync))
    return {name: [round(statistics.median(t[i] for t in samples_of) * 1e6, 1) for i in (0, 1)]
            for name, samples_of in times.items()}


def _phases(device, count: int) -> dict[str, Callable[[], object]]:
    """The parts of a call, timed alone (names prefixed "phase:"); a checkout lacking one skips it."""
    import torch

    from pipegrid.kernels import FlatLayout, buffers, views

    tensors = [torch.randn(n, device=device) for n in mixed_sizes(count, MB, seed=count)]
    layout = FlatLayout.from_tensors(tensors)
    flat = buffers._allocate(layout, device, zero=True)
    cases = {
        "phase: FlatLayout.from_tensors": lambda: FlatLayout.from_tensors(tensors),
        "phase: layout.check": lambda: layout.check(tensors),
        "phase: device check": lambda: buffers._device_of(tensors, flat),
        "phase: allocate (zeroed)": lambda: buffers._allocate(layout, device, zero=True),
        "phase: views": lambda: views(flat, layout),
    }
    try:
        from pipegrid.kernels import segment_table as st
    except ImportError:  # a checkout from before segment tables were cached
        return cases

    def to_device(host):  # as cupy_kernels._device_table; on CPU the table stays where it is
        table = torch.from_numpy(host)
        return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
    place, ptrs, cache = (device.index, 0), st.addresses(tensors), st.TableCache()
    return {**cases,
            "phase: dense (contiguity)": lambda: st.dense(tensors),
            "phase: addresses": lambda: st.addresses(tensors),
            "phase: table template, built": lambda: st.template.__wrapped__(layout, "bytes"),
            "phase: table, cache miss": lambda: st.TableCache().get(layout, "bytes", ptrs, place, to_device),
            "phase: table, cache hit": lambda: cache.get(layout, "bytes", ptrs, place, to_device),
            "phase: plan_pack, cache hit": lambda: st.plan_pack(tensors, flat, layout, None, cache, place, to_device)}


def _run_worker(tree: str, device: str, tensors: int, target_s: float, samples: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree, "--device", device,
               "--tensors", str(tensors), "--target-s", str(target_s), "--samples", str(samples)]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the worker for {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(device: str, rounds: int = 1, before: str | None = None, tensors: int = 1000,
            target_s: float = 0.02, samples: int = 5) -> dict:
    """Alternating rounds of this tree's worker (and ``before``'s), medians per case."""
    trees = {"this tree": TREE, **({"before": os.path.abspath(before)} if before else {})}
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for r in range(rounds):
        for label in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            runs[label].append(_run_worker(trees[label], device, tensors, target_s, samples))
    load.append(os.getloadavg()[0])
    medians = {label: {case: [statistics.median(run[case][i] for run in got if case in run) for i in (0, 1)]
                       for case in got[0]} for label, got in runs.items()}
    return {"device": device, "tensors": tensors, "rounds": rounds, "load": load, "trees": trees,
            "median_us": medians, "per_round_us": runs}


BASELINES = {"pack": "pack: torch.cat", "unpack": "unpack: split+copy_"}
"""What issue 27's goals compare with: 1000 tensors >= 3x torch.cat (pack), >= 10x split+copy_ (unpack)."""


def _speedup(times: dict[str, list[float]], case: str) -> str:
    """The baseline's host time over this case's, from the same worker (so the same moment)."""
    base = times.get(BASELINES.get(case.split(":")[0], ""))
    return f"{base[0] / times[case][0]:.2f}x" if base and case in times and times[case][0] else ""


def markdown(result: dict) -> str:
    """One row per case: host us/call per tree (and wall on CUDA), ``before / this tree``."""
    this, before = result["median_us"]["this tree"], result["median_us"].get("before")
    cuda = result["device"].startswith("cuda")
    head = (["case", "this tree: host us", "baseline/it"] + (["wall us"] if cuda else [])
            + (["before: host us", "baseline/it", "before/now"] if before else []))
    lines = [f"{result['tensors']} small fp32 tensors (1 MB) on {result['device']}, median of {result['rounds']} "
             f"round(s); load {result['load'][0]:.1f} -> {result['load'][1]:.1f}; baseline/it: torch.cat's time "
             "(pack) or split+copy_'s (unpack) over the case's", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for case in sorted(set(this) | set(before or {}), key=lambda c: (c.startswith("phase"), c)):
        now, old = this.get(case), (before or {}).get(case)
        cells = [case, f"{now[0]:.1f}" if now else "", _speedup(this, case)]
        cells += [f"{now[1]:.1f}" if now else ""] if cuda else []
        if before:
            ratio = f"{old[0] / now[0]:.2f}x" if now and old and now[0] else ""
            cells += [f"{old[0]:.1f}" if old else "", _speedup(before, case), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--samples", type=int, default=5, help="batches of calls per case and round")
    parser.add_argument("--target-s", type=float, default=0.02, help="seconds one batch of calls lasts")
    parser.add_argument("--before", help="another checkout: alternate rounds with it")
    parser.add_argument("--out", type=Path, help="JSON path (default: only print)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=TREE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.tree)  # the checkout being measured, ahead of any installed pipegrid
        print(json.dumps(worker(args.device, args.tensors, args.target_s, args.samples)))
        return
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = measure(args.device, args.rounds, args.before, args.tensors, args.target_s, args.samples)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
