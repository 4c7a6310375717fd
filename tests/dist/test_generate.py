"""engine.generate on gloo: greedy decoding equals transformers' ``generate`` in one process
(fp32, same weights) for GPT-2, Llama and Qwen2 at pipe 1, 2 and 3, with and without left
padding, with a batch the micro-batches do not divide and with sequences that finish at
EOS (a whole micro-batch included); seeded sampling draws the same tokens at every pipe
degree. One ``run_local`` launch per pipe degree runs every case.
"""

from __future__ import annotations

import pytest
import torch

import pipegrid as pg
from pipegrid import hf
from pipegrid.launch import run_local
from tests.support.hf_models import ATTN, FAMILIES, VOCAB, load_reference, save_tiny

NEW_TOKENS = 6
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 11}


def _prompts(padded: bool, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (batch, 6), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
        mask[3, :1] = 0
        ids[mask == 0] = 0
    return ids, mask


def _cases(checkpoints: dict[str, str], eos: dict[str, int]) -> list[dict]:
    cases = [{"family": f, "padded": padded, "micro_batches": 2, "kwargs": {}}
             for f in FAMILIES for padded in (False, True)]
    cases += [{"family": "llama", "padded": True, "micro_batches": 1, "kwargs": {}}]  # m = 1 < p: never full
    cases += [{"family": f, "padded": True, "micro_batches": 5, "kwargs": {"eos_token_id": eos[f], "pad_token_id": 0}}
              for f in FAMILIES]  # one sequence per micro-batch: a micro-batch that finishes leaves
    cases += [{"family": f, "padded": True, "micro_batches": 3, "kwargs": SAMPLING} for f in FAMILIES]
    for case in cases:
        case["dir"] = checkpoints[case["family"]]
    return cases


def _generate_all(cases: list[dict], pipe: int) -> list[torch.Tensor]:
    out, engines = [], {}
    for case in cases:
        if case["dir"] not in engines:
            model = hf.from_pretrained(case["dir"], topology=pg.Topology(pipe=pipe), attn_implementation=ATTN)
            engines[case["dir"]] = pg.initialize(model, {"topology": {"pipe": pipe}, "comm": {"timeout_s": 60},
                                                         "schedule": {"name": "1f1b", "micro_batches": 2}})
        ids, mask = _prompts(case["padded"])
        out.append(engines[case["dir"]].generate(ids, mask, max_new_tokens=NEW_TOKENS,
                                                 micro_batches=case["micro_batches"], **case["kwargs"]))
    return out


def _reference(case: dict) -> torch.Tensor:
    model = load_reference(case["dir"])
    ids, mask = _prompts(case["padded"])
    kwargs = {"eos_token_id": None, "pad_token_id": 0, **case["kwargs"]}
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_generate")
    return {family: save_tiny(family, str(root / family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def eos(checkpoints) -> dict[str, int]:
    """Per family, a token greedy decoding emits early in row 0: as EOS it ends that sequence."""
    out = {}
    for family, directory in checkpoints.items():
        ids, mask = _prompts(True)
        greedy = load_reference(directory).generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0)
        out[family] = int(greedy[0, ids.shape[1]])
    return out


@pytest.fixture(scope="module")
def results(checkpoints, eos) -> dict[int, list[torch.Tensor]]:
    cases = _cases(checkpoints, eos)
    return {pipe: run_local(_generate_all, pipe, (cases, pipe), timeout_s=300) for pipe in (1, 2, 3)}


@pytest.mark.parametrize("pipe", [1, 2, 3])
def test_greedy_equals_transformers_generate(checkpoints, eos, results, pipe: int) -> None:
    cases = _cases(checkpoints, eos)
    for i, case in enumerate(cases):
        if case["kwargs"].get("do_sample"):
            continue
        want = _reference(case)
        for rank, per_rank in enumerate(results[pipe]):
            assert torch.equal(per_rank[i], want), (f"{case['family']} padded={case['padded']} "
                                                    f"{case['kwargs']} pipe={pipe} rank {rank}:\n"
                                                    f"{per_rank[i]}\nwant\n{want}")


def test_eos_ends_sequences_early(checkpoints, eos, results) -> None:
    cases = _cases(checkpoints, eos)
    for i, case in enumerate(cases):
        if "eos_token_id" in case["kwargs"]:
            row = results[1][0][i][0, 6:]
            assert row[0] == eos[case["family"]] and bool((row[1:] == 0).all()), row


def test_seeded_sampling_draws_the_same_tokens_at_every_pipe_degree(checkpoints, eos, results) -> None:
    cases = _cases(checkpoints, eos)
    for i, case in enumerate(cases):
        if not case["kwargs"].get("do_sample"):
            continue
        first = results[1][0][i]
        assert first.shape == (5, 6 + NEW_TOKENS)
        for pipe in (2, 3):
            for per_rank in results[pipe]:
                assert torch.equal(per_rank[i], first), f"{case['family']} pipe={pipe}"
