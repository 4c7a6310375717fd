"""engine.generate for a LayerSpec model (the GPT example, which implements the cache
protocol): greedy tokens equal a cacheless full forward per token in one process at pipe
1, 2 and 3, left padding and a batch the micro-batches do not divide included; at
(pipe, tensor) = (1, 2), (2, 2) and (1, 4), sequence parallelism (and dropout) on and off, greedy and seeded
sampled tokens (and at pipe 2 with 2 chunks per rank, V and loop) equal the tensor-1 engine's
and a plain-torch decode of the same weights
(tests.support.reference.PlainGPT); and what ``generate`` refuses, before any work, with
the fix in the message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pipegrid as pg
from examples.models.gpt import GPT, tiny_gpt_config
from pipegrid.launch import run_local
from pipegrid.pipe.generate_request import check_request
from pipegrid.pipe.sampling import Sampling
from tests.support.reference import PlainGPT

NEW_TOKENS = 5


def _config(**overrides):
    return tiny_gpt_config(n_layer=3, seq_len=16, **overrides)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, _config().vocab_size, (5, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is row 4's prompt, left padded
    ids[1, 3:] = ids[4, :3]
    ids[1, :3] = 0
    return ids, mask


@torch.no_grad()
def _greedy_full_pass(ids: torch.Tensor) -> torch.Tensor:
    """One row at a time, its real tokens only, a whole forward per new token: no cache."""
    model = GPT(_config(), seed=7).eval()
    out = ids
    for _ in range(NEW_TOKENS):
        out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def _generate(pipe: int) -> torch.Tensor:
    model = GPT(_config(), topology=pg.Topology(pipe=pipe), seed=7)
    engine = pg.initialize(model, {"topology": {"pipe": pipe}, "comm": {"timeout_s": 60},
                                   "schedule": {"name": "1f1b", "micro_batches": 2}})
    ids, mask = _prompts()
    return engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, micro_batches=2)


@pytest.mark.parametrize("pipe", [1, 2, 3])
def test_gpt_greedy_equals_a_full_pass_per_token(pipe: int) -> None:
    ids, mask = _prompts()
    for rank, got in enumerate(run_local(_generate, pipe, (pipe,), timeout_s=120)):
        for row in range(ids.shape[0]):
            real = ids[row][mask[row].bool()][None]
            want = _greedy_full_pass(real)[0, real.shape[1]:]
            assert torch.equal(got[row, ids.shape[1]:], want), f"pipe={pipe} rank {rank} row {row}"


def _check(module, **overrides):
    args = {"pipe": 1, "tensor": 1, "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "attention_mask": None, "max_new_tokens": 3, "sampling": Sampling(), "eos_token_id": None,
            "pad_token_id": None, "seed": 0, "micro_batches": None, "default_micro_batches": 2}
    args.update(overrides)
    return check_request(module, **args)


@pytest.mark.parametrize("overrides,error,match", [
    ({"input_ids": torch.zeros(2, 17, dtype=torch.long)}, ValueError, "17 tokens long but the model has 16 positions"),
    ({"max_new_tokens": 14}, ValueError, "set max_new_tokens <= 13"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1"),
    ({"input_ids": torch.zeros(2, 4)}, TypeError, "2-D integer tensor"),
    ({"attention_mask": torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])}, ValueError, "left-padded"),
    ({"micro_batches": 3}, ValueError, r"micro_batches must be an int in \[1, batch size 2\]"),
    ({"eos_token_id": -1}, ValueError, "eos_token_id must be a token id"),
])
def test_bad_input_is_refused_with_the_fix(overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        _check(GPT(_config()), **overrides)


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature must be a number > 0"),
                                          ({"top_k": 0}, "top_k must be an int >= 1"),
                                          ({"top_p": 1.5}, r"top_p must be in \(0, 1\]")])
def test_sampling_arguments_out_of_range_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Sampling(do_sample=True, **kwargs)


def test_a_module_that_does_not_say_how_its_logits_split_is_refused_at_tensor_2() -> None:
    module = pg.PipelineModule([pg.LayerSpec(nn.Embedding, 8, 4), pg.LayerSpec(nn.Linear, 4, 8)])
    with pytest.raises(ValueError, match="PipelineModule.vocab_parallel_group"):
        _check(module, tensor=2)
    assert _check(GPT(_config()), tensor=2).max_new_tokens == 3  # the GPT example says it


class _Mixer(nn.Module):
    """Mixes positions (a cumulative mean), so it cannot run on the new tokens alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]


def test_a_layerspec_model_without_the_cache_protocol_is_told_what_to_implement() -> None:
    module = pg.PipelineModule([pg.LayerSpec(nn.Embedding, 8, 4), pg.LayerSpec(_Mixer), pg.LayerSpec(nn.Linear, 4, 8)])
    with pytest.raises(TypeError, match="_Mixer define no forward_cached.*pipegrid.CachedLayer"):
        _check(module)


def test_defaults_pick_micro_batches_up_to_the_batch() -> None:
    request = _check(GPT(_config()), input_ids=torch.zeros(5, 4, dtype=torch.long), default_micro_batches=8)
    assert request.micro_batches == 5 and [len(r) for r in request.batch_rows] == [1] * 5
    request = _check(GPT(_config()), input_ids=torch.zeros(5, 4, dtype=torch.long))
    assert [len(r) for r in request.batch_rows] == [3, 2]


# ---- tensor parallel: against the tensor-1 engine and a plain-torch decode ----------------

SEED = 11
DECODES = {"greedy": {}, "sampled": {"do_sample": True, "temperature": 0.8, "top_k": 20, "seed": SEED}}


# layout -> (sequence_parallel, dropout, chunks per rank: schedule and placement)
LAYOUTS = {"whole": (False, 0.0, None), "sequence_parallel+dropout": (True, 0.1, None),
           "2 chunks (v)": (False, 0.0, ("zb_v", "v")), "2 chunks (loop)": (False, 0.0, ("interleaved_1f1b", "loop"))}


def _layouts(pipe: int, tensor: int) -> list[str]:
    chunked = ["2 chunks (v)", "2 chunks (loop)"] if pipe > 1 else []
    return ["whole"] + (["sequence_parallel+dropout"] if tensor > 1 else []) + chunked


def _generate_grid(pipe: int, tensor: int) -> dict[tuple[str, str], torch.Tensor]:
    """On every rank: (layout, decode) -> sequences, the GPT built for this grid; the sequence-parallel
    one with dropout 0.1 too (generate runs in eval: no mask drawn); at pipe 2 also 2 chunks per rank
    (V and loop placement)."""
    topology = {"pipe": pipe, "tensor": tensor}
    groups = pg.init_distributed({"topology": topology})
    out = {}
    for layout in _layouts(pipe, tensor):
        sequence_parallel, dropout, chunks = LAYOUTS[layout]
        schedule, placement = chunks or ("1f1b", "loop")
        virtual = 2 if chunks else 1
        model = GPT(_config(sequence_parallel=sequence_parallel, dropout=dropout), topology=groups.topology, seed=7,
                    tensor_group=groups.tensor_parallel_group if tensor > 1 else None, virtual_stages=virtual,
                    stage_placement=placement)
        engine = pg.initialize(model, {"topology": topology, "comm": {"timeout_s": 60}, "schedule": {
            "name": schedule, "micro_batches": 2, "virtual_stages": virtual}}, groups)
        ids, mask = _prompts()
        for name, kwargs in DECODES.items():
            out[(layout, name)] = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, micro_batches=2, **kwargs)
        assert bool(model.sequence_parallel) == sequence_parallel  # generate switched it back on
    return out


def _next_token(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Plain torch: argmax, or temperature then top-k then a multinomial draw."""
    if generator is None:
        return logits.argmax(-1)
    scores = logits / DECODES["sampled"]["temperature"]
    kth = scores.topk(DECODES["sampled"]["top_k"]).values[-1]
    probs = scores.masked_fill(scores < kth, float("-inf")).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.no_grad()
def _plain_decode(name: str) -> torch.Tensor:
    """Each row's real tokens through the dense GPT as plain torch modules, a whole forward per
    new token (no cache), its own generator seeded SEED + row: (B, NEW_TOKENS)."""
    model = PlainGPT(_config(), seed=7).eval()
    ids, mask = _prompts()
    rows = []
    for row in range(ids.shape[0]):
        seq = ids[row][mask[row].bool()]
        generator = torch.Generator().manual_seed(SEED + row) if name == "sampled" else None
        for _ in range(NEW_TOKENS):
            seq = torch.cat([seq, _next_token(model(seq[None])[0, -1], generator)[None]])
        rows.append(seq[-NEW_TOKENS:])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tensor_one() -> dict[tuple[str, str], torch.Tensor]:
    return run_local(_generate_grid, 1, (1, 1), timeout_s=120)[0]


@pytest.mark.parametrize("pipe,tensor", [(1, 2), (2, 2), (1, 4)])
def test_gpt_at_tensor_over_1_equals_tensor_1_and_a_plain_torch_decode(tensor_one, pipe: int, tensor: int) -> None:
    prompt = _prompts()[0].shape[1]
    plain = {name: _plain_decode(name) for name in DECODES}
    assert not torch.equal(plain["greedy"], plain["sampled"]), "sampling drew the greedy tokens: no check of the draws"
    for name in DECODES:
        assert torch.equal(tensor_one[("whole", name)][:, prompt:], plain[name]), f"tensor 1 {name}"
    for rank, got in enumerate(run_local(_generate_grid, tensor * pipe, (pipe, tensor), timeout_s=180)):
        assert {layout for layout, _ in got} == set(_layouts(pipe, tensor))
        for (layout, name), sequences in got.items():
            where = f"pipe={pipe} tensor={tensor} rank {rank} {layout} {name}"
            assert torch.equal(sequences, tensor_one[("whole", name)]), where
            assert torch.equal(sequences[:, prompt:], plain[name]), where
