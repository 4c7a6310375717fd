"""engine.generate's token choice: temperature, top-k and top-p mask exactly what transformers'
logits warpers mask, and a sequence's draws depend on its own seed only (not on which
micro-batch or rows it shares a forward with)."""

from __future__ import annotations

import pytest
import torch

from pipegrid.pipe.sampling import Sampling


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8),
                                                     (0.9, 8, 0.6), (1.0, 1, 0.99)])
def test_processed_logits_equal_transformers_warpers(temperature, top_k, top_p) -> None:
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    want = warpers(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    got = Sampling(True, temperature, top_k, top_p)._processed(scores.clone())
    torch.testing.assert_close(got, want)


def test_a_sequence_draws_from_its_own_generator_whatever_its_neighbours() -> None:
    sampling = Sampling(do_sample=True, temperature=1.0)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    together = sampling.next_tokens(logits, torch.arange(4), sampling.generators(4, seed=7))
    alone = [sampling.next_tokens(logits[i:i + 1], torch.tensor([i]), sampling.generators(4, seed=7))
             for i in range(4)]
    assert torch.equal(together, torch.cat(alone))


def test_greedy_takes_the_most_likely_token() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert Sampling().next_tokens(logits, torch.arange(2), []).tolist() == [1, 0]
