"""Tokens/s of ``engine.generate`` against transformers' ``generate`` and against sampling by a
full pipeline pass per token, side by side in one run on CPU, with the KV cache each rank holds.

1. A Llama-family model where decode is compute-bound on a CPU core (hidden 512, 4 layers,
   64 prompts of 32 tokens, 32 new, greedy): transformers' ``generate`` in one process, then
   ``engine.generate`` at pipe=1 (our loop's overhead over transformers' own) and at pipe=2
   with 2 and 4 micro-batches in flight. One thread per process, so pipe=2 uses 2 cores.
2. The GPT example (examples/models/gpt.py, tiny config) writing 120 characters at pipe=2:
   ``engine.generate`` (what ``train_gpt.py``'s sample now runs) against the full pass per
   character it ran before (``eval_batch`` over the whole window, micro_batches x 16 windows).

    python benchmarks/generate.py [--out benchmarks/results/generate.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
# a module in benchmarks/ can hide a package transformers imports (kernels.py did): the repo root instead
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

LLAMA = dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
BATCH, PROMPT, NEW = 64, 32, 32
REPEATS = 3


def _prompts() -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def _save_llama(directory: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="sdpa").save_pretrained(directory)
    return directory


def _best(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def _transformers(directory: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # every run writes all NEW tokens, as ours does
    ids = _prompts()
    seconds = _best(lambda: model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0))
    return {"what": "transformers generate, 1 process", "seconds": seconds}


def _pipegrid_worker(directory: str, pipe: int, micro_batches: int) -> dict:
    import torch.distributed as dist

    import pipegrid as pg
    from pipegrid import hf

    model = hf.from_pretrained(directory, topology=pg.Topology(pipe=pipe), attn_implementation="sdpa")
    engine = pg.initialize(model, {"topology": {"pipe": pipe}, "comm": {"timeout_s": 120}})
    ids = _prompts()

    def run() -> None:
        dist.barrier()
        engine.generate(ids, max_new_tokens=NEW, micro_batches=micro_batches)

    return {"seconds": _best(run), "cache_bytes": engine.generate_cache_bytes}


def _pipegrid(directory: str, pipe: int, micro_batches: int) -> dict:
    from pipegrid.launch import run_local

    ranks = run_local(_pipegrid_worker, pipe, (directory, pipe, micro_batches), timeout_s=600)
    return {"what": f"engine.generate pipe={pipe}, {micro_batches} micro-batches", "seconds": ranks[0]["seconds"],
            "cache_bytes_per_rank": [r["cache_bytes"] for r in ranks]}


def _gpt_worker(length: int) -> dict:
    from examples.models.gpt import GPT, tiny_gpt_config
    from examples.train_gpt import sample, sample_full_pass
    from pipegrid.conf.apps import GPTAppConfig

    import pipegrid as pg

    cfg = GPTAppConfig()
    cfg.topology.pipe, cfg.sample.length, cfg.comm.timeout_s = 2, length, 120
    groups = pg.init_distributed(cfg)
    engine = pg.initialize(GPT(tiny_gpt_config(), topology=groups.topology), cfg, groups=groups)
    corpus = _Corpus()
    out = {}
    for name, fn in (("generate", sample), ("full pass", sample_full_pass)):
        tic = time.perf_counter()
        fn(engine, groups, corpus, cfg)
        out[name] = time.perf_counter() - tic
    return out


class _Corpus:
    """Enough of examples.data.Corpus for sampling: a held-out text of random characters."""

    chars = [chr(32 + i) for i in range(96)]
    val = torch.randint(0, 96, (20_000,), generator=torch.Generator().manual_seed(1))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if int(i) < 96 else "?" for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    parser.add_argument("--gpt-chars", type=int, default=120)
    args = parser.parse_args()
    from benchmarks.record import write_record
    from pipegrid.launch import run_local

    with tempfile.TemporaryDirectory() as tmp:
        directory = _save_llama(os.path.join(tmp, "llama"))
        rows = [_transformers(directory), _pipegrid(directory, 1, 1), _pipegrid(directory, 2, 2),
                _pipegrid(directory, 2, 4)]
    tokens = BATCH * NEW
    base = rows[0]["seconds"]
    table = [f"Llama hidden {LLAMA['hidden_size']} x {LLAMA['num_hidden_layers']} layers, batch {BATCH}, "
             f"prompt {PROMPT}, {NEW} new tokens, greedy, fp32, 1 thread per process",
             f"{'':44} {'seconds':>8} {'tokens/s':>9} {'vs transformers':>16}  KV cache per rank"]
    for row in rows:
        row["tokens_per_s"] = tokens / row["seconds"]
        cache = ", ".join(f"{b / 2**20:.2f} MiB" for b in row.get("cache_bytes_per_rank", []))
        table.append(f"{row['what']:44} {row['seconds']:8.3f} {row['tokens_per_s']:9.1f} "
                     f"{base / row['seconds']:15.2f}x  {cache}")
    gpt = run_local(_gpt_worker, 2, (args.gpt_chars,), timeout_s=600, backend=None)[0]
    rows.append({"what": f"GPT example, {args.gpt_chars} characters at pipe=2", **gpt})
    table.append(f"GPT example sample of {args.gpt_chars} characters at pipe=2: generate {gpt['generate']:.2f} s, "
                 f"full pass per character {gpt['full pass']:.2f} s ({gpt['full pass'] / gpt['generate']:.1f}x)")
    print("\n".join(table))
    write_record(args.out, rows, table, llama=LLAMA, batch=BATCH, prompt=PROMPT, new_tokens=NEW)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
