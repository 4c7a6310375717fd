"""Peak resident memory of each rank while ``hf.from_pretrained`` loads a checkpoint of a
few hundred MB at pipe 1, 2 and 4, and at pipe 2 x tensor 2, against
``AutoModelForCausalLM.from_pretrained`` in one process. Goal: a rank's peak is about
1/(pipe x tensor) of the weights plus a constant.

Every load runs in a fresh process (a rank builds its stage alone: loading needs no
process group), so one load's memory never counts towards another's. "imports" is the
process's resident memory after importing torch, transformers and pipegrid.hf; "peak" is
its high-water mark (VmHWM) after the load; "peak - imports" is what loading cost. The
tensor=2 ranks start together (they share a gloo group, joined before "imports" is read, so
the group's own memory is excluded too) and read only their slice of each split tensor. The
last column is the high-water mark once every weight has been read once: transformers
maps the files in and leaves the pages to be read on first use, pipegrid.hf copies its
stage's tensors in while loading, so only then are the two comparable.

    python benchmarks/hf_load.py [--dir /tmp/pipegrid-hf-load] [--out benchmarks/results/hf_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run as a script, benchmarks/ is sys.path[0], and a module there can hide a package
# transformers imports (kernels.py hid "kernels" until it became kernel_bandwidth.py): leave it off the path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

# a Llama-family model of ~125M parameters: 0.5 GB in float32, stored in 100 MB shards
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
PIPES = (1, 2, 4)
GRIDS = ((2, 2),)  # (pipe, tensor): every rank of the grid runs at once


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _tensor_parallel_groups(pipe: int, tensor: int, rank: int, store: str):  # noqa: ANN202
    """Join a gloo group of pipe x tensor ranks through a file store; the grid's process groups."""
    import torch.distributed as dist

    import pipegrid as pg

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=pipe * tensor)
    return pg.init_distributed({"topology": {"pipe": pipe, "tensor": tensor}})


def _worker(directory: str, loader: str, pipe: int, stage: int, tensor: int = 1, store: str = "") -> None:
    """One load in this (fresh) process; prints one JSON line. With tensor > 1, ``stage`` is the global rank."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pipegrid import hf

    transformers.utils.logging.disable_progress_bar()
    groups = _tensor_parallel_groups(pipe, tensor, stage, store) if tensor > 1 else None
    imports = _status_mib("VmRSS")
    start = time.perf_counter()
    if loader == "transformers":
        model = AutoModelForCausalLM.from_pretrained(directory)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    elif groups is not None:
        model = hf.from_pretrained(directory, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        model = hf.from_pretrained(directory, pipe=pipe, pipe_rank=stage)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    with torch.no_grad():  # transformers maps the files in lazily: count the pages once they are read
        assert all(bool(torch.isfinite(p.float().sum())) for p in model.parameters())
    print(json.dumps({"loader": loader, "pipe": pipe, "tensor": tensor, "rank": stage, "weights_mib": weights / 2**20,
                      "imports_mib": imports, "peak_mib": peak, "peak_after_reading_mib": _status_mib("VmHWM"),
                      "seconds": seconds,
                      "torch": torch.__version__, "transformers": transformers.__version__}))


def _make_checkpoint(directory: str) -> float:
    """Save the model once (float32, 100 MB shards); its size in MiB."""
    if not os.path.exists(os.path.join(directory, "config.json")):
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).save_pretrained(directory, max_shard_size="100MB")
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".safetensors")) / 2**20


def _run(directory: str, loader: str, pipe: int, stage: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", directory, loader, str(pipe), str(stage)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": REPO})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_grid(directory: str, pipe: int, tensor: int) -> list[dict]:
    """Every rank of a pipe x tensor grid at once, each in its own process."""
    store = os.path.join(directory, f".store-{os.getpid()}-{pipe}x{tensor}")
    if os.path.exists(store):
        os.remove(store)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", directory, "pipegrid.hf", str(pipe), str(rank),
                               "--tensor", str(tensor), "--store", store], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO}) for rank in range(pipe * tensor)]
    outs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a pipe={pipe} x tensor={tensor} rank failed: {[p.returncode for p in procs]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/pipegrid-hf-load")
    parser.add_argument("--out", default="benchmarks/results/hf_load.json")
    parser.add_argument("--worker", nargs=4, metavar=("DIR", "LOADER", "PIPE", "STAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--tensor", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        directory, loader, pipe, stage = args.worker
        _worker(directory, loader, int(pipe), int(stage), args.tensor, args.store)
        return
    size = _make_checkpoint(args.dir)
    rows = [_run(args.dir, "transformers", 1, 0)]
    rows += [_run(args.dir, "pipegrid.hf", pipe, stage) for pipe in PIPES for stage in range(pipe)]
    rows += [row for pipe, tensor in GRIDS for row in _run_grid(args.dir, pipe, tensor)]
    lines = [f"checkpoint: {size:.0f} MiB of float32 safetensors in 100 MB shards (Llama, 125M parameters)", "",
             "| loader | pipe | tensor | rank | weights on the rank MiB | imports MiB | peak MiB | peak - imports MiB "
             "| load s | peak after reading every weight MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "AutoModelForCausalLM.from_pretrained" if r["loader"] == "transformers" else "hf.from_pretrained"
        lines.append(f"| {name} | {r['pipe']} | {r.get('tensor', 1)} | {r['rank']} | {r['weights_mib']:.0f} | {r['imports_mib']:.0f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['imports_mib']:.0f} | {r['seconds']:.2f} | "
                     f"{r['peak_after_reading_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "checkpoint_mib": size, "config": CONFIG, "rows": rows, "table": table},
                  f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
