"""The example GPT split over tensor ranks, put back together: each rank's parameters with
their split dim, and every pipe stage's shards compared with the dense model's parameters."""

from __future__ import annotations

import re

import torch
from torch import nn

from examples.models.gpt import GPTConfig

GPT_CFG = GPTConfig(vocab_size=16, seq_len=6, n_layer=2, n_head=2, n_embd=8)


def sharded_state(module: nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """name -> (this rank's tensor, its split dim or None when replicated)."""
    return {re.sub(r"^stages\.\d+\.", "", name): (p.detach().clone(), getattr(p, "partition_dim", None))
            for name, p in module.named_parameters()}


def assert_matches_dense(results: list[dict], reference: dict) -> None:
    """Every rank reports the dense losses; each pipe stage's shards, concatenated along
    their split dim, equal the dense parameters (on every data rank)."""
    for result in results:
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{result['coord']} losses: {m}")
    by_stage: dict[tuple[int, int], list[dict]] = {}
    for result in sorted(results, key=lambda r: r["coord"]):  # (pipe, data, tensor): tensor ranks in order
        by_stage.setdefault(result["coord"][:2], []).append(result["state"])
    seen = set()
    for (pipe, data), states in by_stage.items():
        for name, (_, dim) in states[0].items():
            shards = [state[name][0] for state in states]
            full = torch.cat(shards, dim=dim) if dim is not None else shards[0]
            torch.testing.assert_close(full, reference["state"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"(pipe, data)=({pipe}, {data}) parameter {name}: {m}")
            if dim is None:  # replicated: every tensor rank holds the same value
                for shard in shards[1:]:
                    assert torch.equal(shard, shards[0]), f"{name} differs across tensor ranks"
            seen.add(name)
    assert seen == set(reference["state"]), f"parameters never compared: {set(reference['state']) - seen}"
