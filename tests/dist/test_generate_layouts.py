"""engine.generate on the layouts training uses, on gloo, against transformers' ``generate`` in
one process (fp32, greedy, the same weights):

- a model trained under zb_v (V placement: first and last stage on rank 0) and under
  interleaved_1f1b (loop placement), pipe 2 x 2 chunks, generates from the weights it trained;
- tensor 2 at pipe 1 and 2 (vocab-parallel logits gathered at the last position only);
- EOS-heavy prompts: exact tokens, and every rank runs exactly the forwards of the steps its
  micro-batches still had live rows in (counted, no timing);
- seeded sampling draws the same tokens at tensor 1 and 2, pipe 1 and 2, 1 and 2 chunks.

Three launches (2, 2 and 4 processes) run every case.
"""

from __future__ import annotations

import pytest
import torch

import pipegrid as pg
from pipegrid import hf
from pipegrid.launch import run_local
from tests.support.hf_models import ATTN, VOCAB, lm_batches, load_reference, save_tiny

NEW_TOKENS = 8
BATCH = 5
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 30, "top_p": 0.95, "seed": 5}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.5}
LAYOUTS = {  # schedule, chunks, placement of the module
    "1f1b": ("1f1b", 1, "loop"),
    "zb_v": ("zb_v", 2, "v"),
    "interleaved": ("interleaved_1f1b", 2, "loop"),
}


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (BATCH, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[3, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def _run(cases: list[dict], topology: dict) -> list[dict]:
    """On every rank: each case's model on its layout, trained first where the case says so."""
    groups = pg.init_distributed({"topology": topology})
    out = []
    for case in cases:
        schedule, chunks, placement = LAYOUTS[case["layout"]]
        tensor_group = groups.tensor_parallel_group if topology.get("tensor", 1) > 1 else None
        model = hf.from_pretrained(case["dir"], topology=groups.topology, attn_implementation=ATTN,
                                   tensor_group=tensor_group, virtual_stages=chunks, stage_placement=placement)
        engine = pg.initialize(model, {"topology": topology, "optimizer": SGD, "comm": {"timeout_s": 60},
                                       "schedule": {"name": schedule, "micro_batches": 2, "virtual_stages": chunks}},
                               groups)
        if case.get("train_to"):
            for step in range(2):
                engine.train_batch(iter(lm_batches(2, seed=step)))
            hf.save_pretrained(engine, case["train_to"])
        ids, mask = _prompts()
        sequences = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, micro_batches=case["micro_batches"],
                                    pad_token_id=0, **case.get("kwargs", {}))
        report = engine.generate_report
        out.append({"sequences": sequences, "forwards_run": report.forwards_run,
                    "forwards_scheduled": report.forwards_scheduled, "skipped": report.instructions_skipped,
                    "stages": len(engine.schedule.stages_of(engine.pipe_rank))})
    return out


def _reference(directory: str, **kwargs) -> torch.Tensor:
    ids, mask = _prompts()
    kwargs = {"eos_token_id": None, "pad_token_id": 0, **kwargs}
    return load_reference(directory).generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                              **kwargs)


def _forwards_needed(sequences: torch.Tensor, eos: int, micro_batches: int) -> int:
    """Per model stage: each micro-batch runs the steps up to its last row's EOS (or the end)."""
    new = sequences[:, _prompts()[0].shape[1]:]  # shorter than NEW_TOKENS when every row finished
    total = 0
    for rows in torch.arange(BATCH).tensor_split(micro_batches):
        ends = []
        for row in rows.tolist():
            hits = (new[row] == eos).nonzero()
            ends.append(int(hits[0]) if len(hits) else NEW_TOKENS - 1)
        total += max(ends) + 1
    return total


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_generate_layouts")
    return {family: save_tiny(family, str(root / family), n_layer=4) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def eos(checkpoints) -> int:
    """The token that, as EOS, ends llama's greedy micro-batches (3 of them) soonest."""
    greedy = _reference(checkpoints["llama"])
    return min(range(VOCAB), key=lambda token: _forwards_needed(greedy, token, 3))


def _cases(checkpoints: dict[str, str], eos: int, tmp: str, tensor: int, pipe: int) -> list[dict]:
    llama, gpt2 = checkpoints["llama"], checkpoints["gpt2"]
    eos_kwargs = {"eos_token_id": eos}
    cases = [{"name": "greedy", "dir": llama, "layout": "1f1b", "micro_batches": 2},
             {"name": "eos", "dir": llama, "layout": "1f1b", "micro_batches": 3, "kwargs": eos_kwargs},
             {"name": "sampled", "dir": llama, "layout": "1f1b", "micro_batches": 2, "kwargs": SAMPLING}]
    if tensor == 2 and pipe == 2:
        cases.append({"name": "greedy", "dir": gpt2, "layout": "1f1b", "micro_batches": 3})  # tied, split head
    if tensor == 1:
        cases += [{"name": "trained", "dir": gpt2, "layout": "zb_v", "micro_batches": 3, "train_to": f"{tmp}/zb_v"},
                  {"name": "trained", "dir": llama, "layout": "interleaved", "micro_batches": 2,
                   "train_to": f"{tmp}/interleaved"},
                  {"name": "eos", "dir": llama, "layout": "zb_v", "micro_batches": 3, "kwargs": eos_kwargs},
                  {"name": "sampled", "dir": llama, "layout": "zb_v", "micro_batches": 3, "kwargs": SAMPLING}]
    return cases


GRIDS = {"pipe2": {"pipe": 2}, "tensor2": {"pipe": 1, "tensor": 2}, "pipe2_tensor2": {"pipe": 2, "tensor": 2}}


@pytest.fixture(scope="module")
def results(checkpoints, eos, tmp_path_factory) -> dict[str, tuple[list[dict], list[list[dict]]]]:
    tmp = str(tmp_path_factory.mktemp("trained"))
    out = {}
    for name, grid in GRIDS.items():
        cases = _cases(checkpoints, eos, tmp, grid.get("tensor", 1), grid["pipe"])
        world = grid["pipe"] * grid.get("tensor", 1)
        out[name] = (cases, run_local(_run, world, (cases, grid), timeout_s=300))
    return out


@pytest.mark.parametrize("grid", list(GRIDS))
def test_greedy_equals_transformers_generate(results, grid: str) -> None:
    cases, per_rank = results[grid]
    for i, case in enumerate(cases):
        if case["name"] == "sampled":
            continue
        want = _reference(case.get("train_to") or case["dir"], **case.get("kwargs", {}))
        for rank, got in enumerate(per_rank):
            assert torch.equal(got[i]["sequences"], want), (f"{grid} {case['layout']} {case['name']} rank {rank}:\n"
                                                            f"{got[i]['sequences']}\nwant\n{want}")


@pytest.mark.parametrize("grid", list(GRIDS))
def test_finished_micro_batches_stop_running_forwards(results, eos, grid: str) -> None:
    cases, per_rank = results[grid]
    checked = 0
    for i, case in enumerate(cases):
        if case["name"] != "eos":
            continue
        for rank, got in enumerate(per_rank):
            needed = _forwards_needed(got[i]["sequences"], eos, case["micro_batches"]) * got[i]["stages"]
            assert got[i]["forwards_run"] == needed, f"{grid} {case['layout']} rank {rank}: {got[i]}"
            assert needed < got[i]["forwards_scheduled"] and got[i]["skipped"] > 0
            checked += 1
    assert checked


def test_seeded_sampling_draws_the_same_tokens_on_every_layout(results) -> None:
    drawn = [(grid, case["layout"], got[i]["sequences"]) for grid, (cases, per_rank) in results.items()
             for i, case in enumerate(cases) if case["name"] == "sampled" for got in per_rank]
    first = drawn[0][2]
    assert len(drawn) == 2 * 2 + 2 + 4 and first.shape == (BATCH, 6 + NEW_TOKENS)
    for grid, layout, sequences in drawn:
        assert torch.equal(sequences, first), f"{grid} {layout}:\n{sequences}\nwant\n{first}"
