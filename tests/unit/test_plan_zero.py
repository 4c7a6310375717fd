"""Planner and ZeRO-2/3 and optimizer offload: the offload step's time, the memory it moves to the
host, which ZeRO settings are candidates, and the search proposing them (with the reason) only when
a layout does not fit otherwise."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipegrid.plan import (
    Candidate,
    ClusterSpec,
    DeviceSpec,
    LayerCost,
    predict,
    search,
    transformer_config_from_hf,
)
from pipegrid.plan.predict import offload_step_s
from pipegrid.plan.search import SearchSpace, candidates

H100 = DeviceSpec(peak_flops=989e12, memory_bytes=80 * 2 ** 30, memory_bandwidth=3350e9,
                  host_link_bandwidth=50e9, host_memory_bandwidth=400e9, host_memory_bytes=2048 * 2 ** 30)
ONE_HOST = ClusterSpec("h100_8", 1, 8, H100, intra_gbytes_per_s=450.0, inter_gbytes_per_s=50.0)
LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
QUICK = SearchSpace(schedules=("1f1b",), micro_batch_sizes=(1,), shortlist=2)


def _blocks(n: int = 8) -> list[LayerCost]:
    return [LayerCost("Block", 1000, forward_s=1e-3, backward_s=2e-3, activation_bytes=400,
                      checkpoint_bytes=100, output_bytes=100) for _ in range(n)]


def _llama(tmp_path, **training) -> object:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    return transformer_config_from_hf(str(path), **{"seq_len": 4096, "global_batch": 64, "dtype": "bfloat16",
                                                    "recompute": True, **training})


def test_offload_step_is_the_cpu_step_at_shared_host_bandwidth_plus_both_copies():
    # 28 bytes per parameter over 1/8 of the host's 400 GB/s, 8 bytes over the 50 GB/s link
    assert offload_step_s(1e9, H100, 8) == pytest.approx(1e9 * 28 / 50e9 + 1e9 * 8 / 50e9)
    assert offload_step_s(1e9, H100, 1) < offload_step_s(1e9, H100, 8)  # alone on the host: faster


def test_an_offloaded_prediction_keeps_no_optimizer_state_on_the_device():
    cluster = ClusterSpec("cpu", 1, 4, DeviceSpec(1e11, 2 ** 30, 1e10), 5.0, 5.0)
    plain, off = (predict(_blocks(), Candidate(pipe=2, data=2, zero=2, offload=o), cluster, micro_batches=4)
                  for o in (False, True))
    assert off.candidate.label().endswith("zero2 offload")
    assert off.memory["optimizer"] == off.memory["master_weights"] == 0
    assert off.memory["optimizer_host"] == plain.memory["optimizer"] > 0
    assert off.host_bytes > 0 and off.peak_memory_bytes == plain.peak_memory_bytes - plain.memory["optimizer"]
    shard = 4000 / 2  # pipe rank 0's 4 blocks over 2 data ranks
    assert off.optimizer_s == pytest.approx(offload_step_s(shard, cluster.device, 4))


def test_candidates_offer_only_zero_settings_the_engine_takes_and_that_do_something(tmp_path):
    space = SearchSpace(schedules=("1f1b",), micro_batch_sizes=(1,), zero=(0, 1, 2, 3), offload=(False, True))
    found = candidates(_llama(tmp_path), ONE_HOST, space)
    assert {(int(c.zero), c.offload) for c in found if c.data == 1} == {(0, False), (1, True)}
    assert not any(c.offload and not c.zero for c in found)  # offload needs a ZeRO stage
    assert {(int(c.zero), c.offload) for c in found if c.data > 1} == \
        {(0, False), *((z, o) for z in (1, 2, 3) for o in (False, True))}


def test_a_70b_llama_on_8_gpus_of_80_gb_is_proposed_with_offload_and_says_why(tmp_path):
    ranked = search(_llama(tmp_path), ONE_HOST, replace(QUICK, bucket_elements=None), top=3)  # never bucketed
    best = ranked[0]
    assert best.candidate.offload and best.fits
    assert best.memory["optimizer"] == 0 and best.host_bytes > 0
    note = best.notes[-1]
    assert note.startswith("optimizer offload: no layout fits 80 GiB per device otherwise") and "host" in note


def test_the_search_stays_within_its_space_when_a_layout_fits(tmp_path):
    small = _llama(tmp_path, global_batch=8)
    roomy = ClusterSpec("h200_8", 1, 8, DeviceSpec(989e12, 1400 * 2 ** 30, 4800e9), 450.0, 50.0)
    ranked = search(small, roomy, QUICK, top=3)
    assert all(not pr.candidate.offload and int(pr.candidate.zero) <= 1 for pr in ranked)
    assert not any("no layout fits" in note for pr in ranked for note in pr.notes)  # (a tie's note may be there)


def test_no_fit_even_with_offload_names_the_fixes(tmp_path):
    tiny_host = DeviceSpec(989e12, 80 * 2 ** 30, 3350e9, host_memory_bytes=64 * 2 ** 30)
    with pytest.raises(ValueError, match="even with ZeRO-3 or optimizer offload; add devices"):
        search(_llama(tmp_path), ClusterSpec("small_host", 1, 8, tiny_host, 450.0, 50.0), QUICK)
