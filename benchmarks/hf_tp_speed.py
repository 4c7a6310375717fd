"""A transformers Llama against pipegrid's own GPT at the same width on the same 3-D grid
(pipe=2 x tensor=2, 4 CPU ranks over gloo): ms per training step, alternating rounds, medians.

Both have n_layer blocks of width ``hidden`` with ``heads`` heads, a tied embedding and head of
``vocab`` tokens and about the same MLP parameters (the GPT's 4h GELU MLP against Llama's
gated MLP of 8h/3, rounded to a multiple of 32: see ``_llama_ffn``). Each split projection costs an
all-reduce of its input gradient in backward (and a row-parallel one in forward): where the
time goes is in docs/hf_tensor_parallel.md.

    python benchmarks/hf_tp_speed.py [--rounds 3] [--tensor 1] [--sequence-parallel]
                                     [--out benchmarks/results/hf_tp_speed.json]

Besides ms per step it counts each rank's collectives over the tensor group (calls, MiB, time
inside them), and times one block of each model in one process, split by a profile into matmuls,
attention and the rest: the two do the same matmul FLOPs, so "the rest" is where they differ.
``--sequence-parallel`` times each model with and without sequence parallelism in the same rounds,
and reports the bytes the first stage saves for backward per micro-batch (its activation memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Self

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/ on sys.path could hide packages transformers imports (benchmarks/kernels.py once hid `kernels`)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pipegrid as pg  # noqa: E402
from pipegrid.launch import run_local  # noqa: E402

SHAPE = {"hidden": 256, "layers": 4, "heads": 8, "vocab": 2048, "seq": 128, "micro_batch": 4, "micro_batches": 4}
GRID = {"pipe": 2, "data": 1, "tensor": 2}
STEPS = 3
COMPILE: dict = {}  # --compile: the compile section both models train with (inductor, each layer)


def _config() -> dict:
    return {"topology": GRID, "schedule": {"name": "1f1b", "micro_batches": SHAPE["micro_batches"]},
            "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4}, "train": {"grad_clip": 1.0},
            "compile": COMPILE}


SP = " + SP"  # a model name ending so runs it with sequence parallelism


def _gpt(groups: pg.ProcessGroups, sequence_parallel: bool = False) -> pg.PipelineModule:
    from examples.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=SHAPE["vocab"], seq_len=SHAPE["seq"], n_layer=SHAPE["layers"], n_head=SHAPE["heads"],
                    n_embd=SHAPE["hidden"], sequence_parallel=sequence_parallel)
    return GPT(cfg, topology=groups.topology, tensor_group=groups.tensor_parallel_group)


def _llama_ffn() -> int:
    """Gated: three matrices of h x ffn against the GPT's two of h x 4h, so both models do about the
    same matmul FLOPs (attention: q, k, v, o of h x h against c_attn 3h x h and c_proj h x h). The
    width is 8h/3 rounded to a multiple of 32 (672 at h=256: 1.6% fewer MLP FLOPs than the GPT), as
    Llama's own sizes are: the exact 682 (341 per tensor rank) ran its matmuls 30-40% slower per
    FLOP on this CPU than 672 or 704, a handicap of the shape, not of the model."""
    return 32 * round(8 * SHAPE["hidden"] / 3 / 32)


def _llama(groups: pg.ProcessGroups, sequence_parallel: bool = False) -> pg.PipelineModule:
    from pipegrid import hf

    return hf.from_config(_llama_config(), topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                          sequence_parallel=sequence_parallel)


# what pipegrid.tensor calls over the tensor group: all-reduces, and under sequence parallelism
# all-gathers and reduce-scatters along the sequence (torch 2.13 names them *_single)
_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
                "reduce_scatter_single")


class _TensorCollectives:
    """Counts the collectives over the tensor group (calls, MiB each rank sends in a ring, seconds inside
    them, waiting for the peer included) by wrapping the torch.distributed functions pipegrid.tensor calls.
    A ring all-reduce of n bytes over t ranks sends 2 n (t - 1) / t per rank, an all-gather or a
    reduce-scatter whose whole tensor is n bytes n (t - 1) / t: sequence parallelism's pair sends what
    the all-reduce it replaces did."""

    def __init__(self, group: object) -> None:
        self.group, self.calls, self.bytes, self.seconds = group, 0, 0, 0.0
        self._originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def __enter__(self) -> Self:
        if self.group is None:  # nothing to count: leave torch.distributed as it is
            return self
        parts = dist.get_world_size(self.group)
        for name, original in self._originals.items():
            sent = (2 if name == "all_reduce" else 1) * (parts - 1) / parts
            setattr(dist, name, self._counted(original, sent))
        return self

    def _counted(self, original: object, sent: float) -> object:
        def counted(*args: object, **kwargs: object) -> object:
            if kwargs.get("group") is not self.group:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls += 1
                whole = max(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
                self.bytes += sent * whole
                self.seconds += time.perf_counter() - start
        return counted

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _saved_activation_bytes(engine: pg.PipelineEngine, inputs: torch.Tensor) -> int | None:
    """Bytes the first stage saves for backward in one micro-batch's forward (its activation memory;
    parameters and views of one storage counted once; a sequence-parallel column layer's chunk
    included), on pipe rank 0; None elsewhere."""
    if engine.groups.coord.pipe != 0:
        return None
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    from pipegrid.tensor import sequence

    # a column layer's gathered input is saved as its chunk, under pipegrid's own (inner) hook: count the chunk
    original = sequence.Regather.__init__

    def counted(regather: sequence.Regather, chunk: torch.Tensor, group: object) -> None:
        original(regather, chunk, group)
        storages[chunk.untyped_storage().data_ptr()] = chunk.untyped_storage().nbytes()

    sequence.Regather.__init__ = counted
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = engine.module.stage_module(0)(inputs)
    finally:
        sequence.Regather.__init__ = original
    del out
    return sum(storages.values())


def _train(model_name: str) -> dict[str, float]:
    """ms per step on this rank (after one warm step), and its tensor-group all-reduces per step."""
    cfg = _config()
    groups = pg.init_distributed(cfg)
    base = model_name.removesuffix(SP)
    model = (_gpt if base == "pipegrid GPT" else _llama)(groups, sequence_parallel=model_name.endswith(SP))
    engine = pg.initialize(model, cfg, groups)
    gen = torch.Generator().manual_seed(0)
    shape = (SHAPE["micro_batch"], SHAPE["seq"])
    batches = [(ids, ids.clone()) for ids in (torch.randint(0, SHAPE["vocab"], shape, generator=gen)
                                               for _ in range(SHAPE["micro_batches"]))]
    engine.train_batch(iter(batches))
    # compiled code guards on dist.all_reduce itself: wrapping it would recompile every layer in
    # the timed steps, so --compile times without the count (the eager run gives the same counts)
    with _TensorCollectives(None if COMPILE else groups.tensor_parallel_group) as reduces:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(STEPS):
            engine.train_batch(iter(batches))
        ms = (time.perf_counter() - start) / STEPS * 1e3
        cpu_ms = (time.process_time() - cpu_start) / STEPS * 1e3  # this rank's own CPU: robust to other load
    return {"ms": ms, "cpu_ms": cpu_ms, "all_reduces": reduces.calls / STEPS,
            "all_reduce_mib": reduces.bytes / STEPS / 2**20,
            "all_reduce_ms": reduces.seconds / STEPS * 1e3,
            "saved_bytes": _saved_activation_bytes(engine, batches[0][0])}


def _block_breakdown(rounds: int) -> dict[str, dict[str, float]]:
    """One block in one process, forward + backward on (micro_batch, seq, hidden): transformers'
    LlamaDecoderLayer against pipegrid's GPT Block, alternating; the median ms and the share of
    matmuls, attention and the rest (norms, rotary, activations, residuals) in a profile."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from examples.models.gpt import Block, GPTConfig

    hidden, seq = SHAPE["hidden"], SHAPE["seq"]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=_llama_ffn(), num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["heads"], max_position_embeddings=seq)
    config._attn_implementation = "sdpa"
    x = torch.randn(SHAPE["micro_batch"], seq, hidden, requires_grad=True)
    positions = torch.arange(seq)[None].expand(SHAPE["micro_batch"], -1)
    rotary = LlamaRotaryEmbedding(config)(x, positions)  # as pipegrid.hf computes once per stage
    llama = LlamaDecoderLayer(config, 0).train()
    gpt = Block(GPTConfig(vocab_size=SHAPE["vocab"], seq_len=seq, n_layer=SHAPE["layers"], n_head=SHAPE["heads"],
                          n_embd=hidden)).train()
    blocks = {"pipegrid GPT": lambda: gpt(x),
              "transformers Llama": lambda: llama(x, attention_mask=None, position_ids=positions,
                                                  position_embeddings=rotary)}
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        for name, block in blocks.items():
            start = time.perf_counter()
            block().sum().backward()
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, block in blocks.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                block().sum().backward()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        out[name] = {"ms": statistics.median(times[name]), "matmul": matmul / total, "attention": attention / total,
                     "rest": 1 - (matmul + attention) / total}
    return out


def _norm_costs(rounds: int) -> dict[str, float]:
    """What sequence parallelism halves per rank, in one process: one norm and one residual add,
    forward and backward, on (micro_batch, seq, hidden) and on seq / tensor tokens (median ms)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hidden, seq, tensor = SHAPE["hidden"], SHAPE["seq"], max(GRID["tensor"], 2)
    out = {}
    for name, norm in (("Llama RMSNorm", LlamaRMSNorm(hidden)), ("GPT LayerNorm", torch.nn.LayerNorm(hidden))):
        for tokens in (seq, seq // tensor):
            x = torch.randn(SHAPE["micro_batch"], tokens, hidden, requires_grad=True)
            residual = torch.randn_like(x)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                (norm(x) + residual).sum().backward()
                times.append((time.perf_counter() - start) * 1e3)
            out[f"{name} + residual, T={tokens}"] = statistics.median(times)
    return out


def _llama_config() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=_llama_ffn(), num_hidden_layers=SHAPE["layers"],
                       num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                       vocab_size=SHAPE["vocab"], max_position_embeddings=SHAPE["seq"], tie_word_embeddings=True)


def _stage_path(rounds: int) -> dict[str, float]:
    """One process, the whole model, forward + backward of one micro-batch (median ms): plain
    transformers (its own forward and loss) against pipegrid.hf's layers chained (the stage path:
    captured rotary tables and masks, the model's loss) and pipegrid's GPT. What pipegrid.hf adds
    over transformers shows as the first two's difference."""
    from transformers import AutoModelForCausalLM

    from examples.models.gpt import GPT, GPTConfig
    from pipegrid import hf

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="sdpa").train()
    staged = hf.from_config(_llama_config(), attn_implementation="sdpa").train()
    gpt = GPT(GPTConfig(vocab_size=SHAPE["vocab"], seq_len=SHAPE["seq"], n_layer=SHAPE["layers"],
                        n_head=SHAPE["heads"], n_embd=SHAPE["hidden"])).train()
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["micro_batch"], SHAPE["seq"]))
    runs = {"transformers Llama, its own forward": lambda: plain(input_ids=ids, labels=ids).loss,
            "transformers Llama, pipegrid.hf layers": lambda: staged.loss_fn(staged(ids), ids),
            "pipegrid GPT": lambda: gpt.loss_fn(gpt(ids), ids)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run().backward()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}  # the first: warm-up


def _print_blocks(blocks: dict[str, dict[str, float]]) -> None:
    gpt = blocks["pipegrid GPT"]["ms"]
    print(f"| one block, fwd+bwd ({SHAPE['micro_batch']} x {SHAPE['seq']} x {SHAPE['hidden']}) | ms (median) "
          "| vs GPT | matmul | attention | rest (ms) |")
    print("|---|---|---|---|---|---|")
    for name, b in blocks.items():
        print(f"| {name} | {b['ms']:.1f} | {b['ms'] / gpt:.2f} | {b['matmul']:.0%} | {b['attention']:.0%} "
              f"| {b['rest']:.0%} ({b['rest'] * b['ms']:.1f}) |")


def _print_steps(times: dict[str, list[float]], cpu: dict[str, list[float]],
                 reduces: dict[str, dict[str, float]]) -> None:
    gpt = statistics.median(times["pipegrid GPT"])
    print(f"| model ({SHAPE['layers']} x {SHAPE['hidden']}, pipe {GRID['pipe']} x tensor {GRID['tensor']}) "
          "| ms/step (median) | rounds | vs GPT | CPU ms/step per rank (median) "
          "| tensor collectives/step (rank 0: calls, MiB sent, ms) | stage 0 activations/micro-batch (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, r = statistics.median(ts), reduces[name]
        print(f"| {name} | {med:.0f} | {', '.join(f'{t:.0f}' for t in ts)} | {med / gpt:.2f} "
              f"| {statistics.median(cpu[name]):.0f} "
              f"| {r['all_reduces']:.0f}, {r['all_reduce_mib']:.1f}, {r['all_reduce_ms']:.0f} "
              f"| {r['saved_bytes'] / 2**20:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensor", type=int, default=2, help="the tensor degree (1: where the time goes without it)")
    parser.add_argument("--out", default="benchmarks/results/hf_tp_speed.json")
    parser.add_argument("--one-process", action="store_true",
                        help="only the one-process comparisons (stage path, one block): robust on a loaded host")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="also each model with sequence parallelism (tensor > 1), in the same rounds")
    parser.add_argument("--compile", action="store_true",
                        help="both models with compile.enabled=true (inductor fuses Llama's elementwise work)")
    args = parser.parse_args(argv)
    if args.compile:
        COMPILE["enabled"] = True
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # 4 workers on a few cores compile alone
    if args.one_process:
        return _one_process(args)
    GRID["tensor"] = args.tensor
    world = GRID["pipe"] * GRID["data"] * GRID["tensor"]
    load_before = os.getloadavg()
    names = ["pipegrid GPT", "transformers Llama"]
    if args.sequence_parallel:
        names = [n for name in names for n in (name, name + SP)]
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    reduces: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):  # alternate, so machine noise hits every system alike
        for name, per_round in times.items():
            ranks = run_local(_train, world, (name,), backend=None, timeout_s=900)
            per_round.append(max(r["ms"] for r in ranks))
            cpu[name].append(statistics.mean(r["cpu_ms"] for r in ranks))
            reduces[name] = ranks[0]
    _print_steps(times, cpu, reduces)
    blocks = _block_breakdown(max(10, 10 * args.rounds))
    _print_blocks(blocks)
    norms = _norm_costs(200) if args.sequence_parallel else {}
    for name, ms in norms.items():
        print(f"| {name} (fwd+bwd, one process) | {ms:.3f} ms |")
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
                   "torch": torch.__version__, "shape": SHAPE, "grid": GRID, "compile": COMPILE, "ms_per_step": times,
                   "cpu_ms_per_step": cpu,
                   "tensor_all_reduces_rank0": reduces, "one_block": blocks, "norm_costs_ms": norms}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def _one_process(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    rounds = max(10, 10 * args.rounds)
    path = _stage_path(rounds)
    print(f"| whole model, one micro-batch fwd+bwd, one process | ms (median of {rounds}) |")
    print("|---|---|")
    for name, ms in path.items():
        print(f"| {name} | {ms:.1f} |")
    blocks = _block_breakdown(rounds)
    _print_blocks(blocks)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_before": load_before,
                   "load_after": os.getloadavg(), "torch": torch.__version__, "shape": SHAPE, "stage_path_ms": path,
                   "one_block": blocks}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
