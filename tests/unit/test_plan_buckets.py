"""Planner and bucketed ZeRO-2/3 (``zero.reduce_every_micro_batch``): the memory it saves, the m
reductions a step it costs (overlapped with the backward only where the device overlaps), and the
search proposing it, with a note and the overrides, where the once-per-step buffer does not fit."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipegrid.conf.schema import ZeroConfig
from pipegrid.plan import Candidate, ClusterSpec, DeviceSpec, LayerCost, predict, search, transformer_config_from_hf
from pipegrid.plan.__main__ import compose, main
from pipegrid.plan.hardware import Link
from pipegrid.plan.memory import OptimizerSpec, in_step_bytes, memory_report
from pipegrid.plan.predict import DEFAULT_BUCKET_ELEMENTS, data_sync_s, ring_allreduce_s
from pipegrid.plan.presets import cluster_from_dict
from pipegrid.plan.search import SearchSpace

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80}
H100 = DeviceSpec(peak_flops=989e12, memory_bytes=80 * 2 ** 30, memory_bandwidth=3350e9,
                  host_link_bandwidth=50e9, host_memory_bandwidth=400e9)
# one device per host: no tensor parallelism, so memory has to come from the data axis; at 42 GiB
# the smallest once-per-step layout (p=4 d=1) needs 42.4 GiB and bucketed ZeRO-2 at p=2 d=2 41.8
FOUR_HOSTS = ClusterSpec("h100_4x1_42g", 4, 1, replace(H100, memory_bytes=42 * 2 ** 30), 450.0, 50.0)
ONE_HOST = ClusterSpec("h100_8", 1, 8, H100, intra_gbytes_per_s=450.0, inter_gbytes_per_s=50.0)
QUICK = SearchSpace(schedules=("1f1b",), micro_batch_sizes=(1,), shortlist=2)
CPU = ClusterSpec("cpu", 1, 4, DeviceSpec(1e11, 2 ** 30, 1e10, overlaps_comm=False), 5.0, 5.0)


def _hf(tmp_path, config: dict, **training) -> object:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return transformer_config_from_hf(str(path), **{"seq_len": 4096, "global_batch": 16, "dtype": "bfloat16",
                                                    "recompute": True, **training})


def _blocks(n: int = 8, parameters: int = 1000) -> list[LayerCost]:
    return [LayerCost("Block", parameters, forward_s=1e-3, backward_s=2e-3, activation_bytes=400,
                      checkpoint_bytes=100, output_bytes=100) for _ in range(n)]


def test_the_default_bucket_is_the_engines():
    assert DEFAULT_BUCKET_ELEMENTS == ZeroConfig().bucket_elements


def test_a_candidate_says_bucketed_in_its_label_and_overrides():
    default = Candidate(pipe=2, data=2, zero=2, bucket_elements=DEFAULT_BUCKET_ELEMENTS)
    assert default.label().endswith("zero2 bucketed")
    assert default.overrides(8) == ["topology.pipe=2", "topology.data=2", "topology.tensor=1", "schedule.name=1f1b",
                                    "schedule.micro_batches=8", "zero.stage=2", "zero.reduce_every_micro_batch=true"]
    small = Candidate(pipe=2, data=2, zero=3, bucket_elements=1 << 18)
    assert small.label().endswith("zero3 bucketed=262144")
    assert small.overrides()[-2:] == ["zero.reduce_every_micro_batch=true", "zero.bucket_elements=262144"]
    assert "reduce_every" not in " ".join(Candidate(pipe=2, data=2, zero=2).overrides())
    with pytest.raises(ValueError, match="needs zero=2 or 3"):
        Candidate(pipe=2, data=2, zero=1, bucket_elements=1024)


def test_the_data_sync_arithmetic():
    link = Link(bandwidth=1e3, latency=0.01)
    # 1000 parameters x 4 bytes over 2 data ranks: shards of 500, buckets of 100 -> 10 buckets per micro-batch
    once = ring_allreduce_s(4000, 2, link)
    assert once == pytest.approx(2 * 0.5 * 4.0 + 2 * 0.01)
    reduce_s = 4000 / 1e3 + 10 * 1 * 0.01  # a reduce of S on a ring: S / bandwidth, (n-1) latencies a bucket
    gather_s = 0.5 * 4.0 + 0.01  # the updated parameters' all-gather, as once per step
    last_bucket_s = 100 * 4 / 1e3 + 0.01
    cand = Candidate(pipe=2, data=2, zero=2, bucket_elements=100)
    # not overlapped (CPU gloo): all four micro-batches' reductions
    assert data_sync_s(1000, 4, cand, 4, link, 4.0, False) == pytest.approx(gather_s + 4 * reduce_s)
    # overlapped, a backward shorter than a reduction: the excess and the last bucket
    assert data_sync_s(1000, 4, cand, 4, link, 1.0, True) == \
        pytest.approx(gather_s + 4 * (reduce_s - 1.0) + last_bucket_s)
    # overlapped under a long backward: never below once per step
    assert data_sync_s(1000, 4, cand, 4, link, 10.0, True) == pytest.approx(once)
    # each bucket's collective costs the host post_s (CPU gloo's per-transfer cost)
    assert data_sync_s(1000, 4, cand, 4, link, 4.0, False, post_s=0.002) == \
        pytest.approx(gather_s + 4 * (reduce_s + 10 * 0.002))
    assert data_sync_s(1000, 4, replace(cand, data=1), 4, link, 0.0, False) == 0.0  # nothing to sync
    assert data_sync_s(1000, 4, replace(cand, bucket_elements=None), 4, link, 0.0, False) == pytest.approx(once)


@pytest.mark.parametrize("overlaps", [True, False])
@pytest.mark.parametrize(("data", "micro_batches", "bucket"), [(2, 1, 10**6), (2, 4, 500), (4, 8, 64), (4, 2, 1)])
def test_bucketed_is_never_predicted_faster(overlaps, data, micro_batches, bucket):
    cluster = replace(CPU, device=replace(CPU.device, overlaps_comm=overlaps), hosts=2)
    once, bucketed = (predict(_blocks(), Candidate(pipe=2, data=data, zero=2, bucket_elements=b), cluster,
                              micro_batches=micro_batches) for b in (None, bucket))
    assert bucketed.step_s >= once.step_s and bucketed.data_sync_s >= once.data_sync_s
    assert bucketed.pipeline_s == once.pipeline_s and bucketed.optimizer_s == once.optimizer_s


def test_one_bucket_per_shard_at_data_2_holds_more_than_the_full_buffer():
    """Buckets of a whole shard: the shard plus both buckets alive is 3 shards against the full
    buffer's 2 (docs/zero.md: a small model gains only with smaller buckets)."""
    once, bucketed = (predict(_blocks(), Candidate(pipe=2, data=2, zero=2, bucket_elements=b), CPU, micro_batches=4)
                      for b in (None, 10**6))
    assert bucketed.memory["step_gradients"] == 3 * 2000 * 4 > once.memory["step_gradients"] == 4000 * 4


def test_the_peak_drops_by_the_full_buffer_less_the_buckets():
    once, bucketed = (predict(_blocks(), Candidate(pipe=2, data=2, zero=2, bucket_elements=b), CPU, micro_batches=4)
                      for b in (None, 300))
    full, shard, buckets = 4000 * 4, 2000 * 4, 3 * 300 * 4  # pipe rank 0: 4 blocks of 1000 fp32 parameters
    assert once.memory["step_gradients"] == full and bucketed.memory["step_gradients"] == shard + buckets
    assert once.peak_memory_bytes - bucketed.peak_memory_bytes == full - shard - buckets
    report = memory_report(4000, OptimizerSpec(), data=2, zero=2, bucket_elements=300)
    assert bucketed.peak_memory_bytes == report["total"] + in_step_bytes(report) + bucketed.memory["activations"]
    # on CPU gloo nothing overlaps: 4 micro-batches each reduce the rank's 16 kB at 5 GB/s
    assert bucketed.data_sync_s > 4 * 16000 / 5e9 > once.data_sync_s


def test_the_search_picks_bucketed_zero2_where_the_full_buffer_does_not_fit(tmp_path):
    space = replace(QUICK, zero=(0, 1, 2), widen=False)
    ranked = search(_hf(tmp_path, LLAMA_8B), FOUR_HOSTS, space, top=3)
    best = ranked[0]
    assert best.fits and best.candidate == Candidate(2, 2, 1, "1f1b", zero=2, bucket_elements=DEFAULT_BUCKET_ELEMENTS)
    assert "zero.reduce_every_micro_batch=true" in best.candidate.overrides(best.micro_batches)
    note = best.notes[0]
    assert "bucket by bucket (zero.reduce_every_micro_batch)" in note and "does not fit 42 GiB" in note
    assert "8 reductions a step instead of one" in note
    once = replace(best.candidate, bucket_elements=None)
    assert not any(pr.candidate == once for pr in ranked)  # it does not fit
    # without bucketing nothing in this space fits
    with pytest.raises(ValueError, match="no candidate"):
        search(_hf(tmp_path, LLAMA_8B), FOUR_HOSTS, replace(space, bucket_elements=None))


def test_the_widened_search_says_the_buckets_make_it_fit(tmp_path):
    best = search(_hf(tmp_path, LLAMA_8B), FOUR_HOSTS, QUICK, top=3)[0]  # ZeRO 0/1 first, then widened
    assert best.candidate.bucket_elements == DEFAULT_BUCKET_ELEMENTS and int(best.candidate.zero) == 2
    assert best.notes[-1].startswith("ZeRO-2 and bucket-by-bucket gradient reduction: no layout fits 42 GiB")


def test_a_70b_llama_on_8_gpus_of_80_gb_runs_bucketed_zero2_with_offload_at_data_2(tmp_path):
    """Before bucketing the pick was p=2 d=1 t=4 ZeRO-1 + offload (test_plan_zero.py): data=2 halves
    the CPU step's shard, and only the buckets leave room for it."""
    best = search(_hf(tmp_path, LLAMA_70B, global_batch=64), ONE_HOST, QUICK, top=3)[0]
    assert (best.candidate.data, int(best.candidate.zero), best.candidate.offload) == (2, 2, True)
    assert best.candidate.bucket_elements and best.fits
    without = search(_hf(tmp_path, LLAMA_70B, global_batch=64), ONE_HOST, replace(QUICK, bucket_elements=None))[0]
    assert best.step_s < without.step_s
    assert best.notes[-1].startswith("ZeRO-2 and bucket-by-bucket gradient reduction and optimizer offload")


def test_the_cli_prints_the_picks_overrides_and_the_cpu_profile_does_not_overlap(capsys):
    assert cluster_from_dict(compose(["cluster=cpu_2"])["cluster"]).device.overlaps_comm is False
    assert cluster_from_dict(compose([])["cluster"]).device.overlaps_comm is True
    main(["model=gpt_18b", "cluster=a100_64", "search.top=3", "search.shortlist=3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run rank 1 with: ")]
    assert len(lines) == 1 and "topology.pipe=" in lines[0] and "schedule.micro_batches=" in lines[0]
