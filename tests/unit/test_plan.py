"""Planner: cost model, memory, simulator reuse, and the published Megatron-LM numbers."""

from __future__ import annotations

import json

import pytest

from pipegrid.plan import (
    REPORT_KEYS, Candidate, ClusterSpec, DeviceSpec, LayerCost, OptimizerSpec, TransformerConfig,
    explain, megatron_flops_per_step, memory_report, model_from_dict, predict, predict_transformer,
    ring_allreduce_s, search, choose, simulate_step, split_chunks, transformer_config_from_hf, Link,
)
from pipegrid.schedules import build, simulate

A100 = DeviceSpec(peak_flops=312e12, memory_bytes=80 * 2 ** 30, memory_bandwidth=2039e9)
GPT_1T = TransformerConfig("gpt_1t", 128, 25600, 160, 2048, 51200, 3072, "float16", True)
PUBLISHED_1T = Candidate(pipe=64, data=6, tensor=8, schedule="interleaved_1f1b", virtual_stages=2,
                         micro_batch_size=1)


def _dgx(hosts: int) -> ClusterSpec:
    return ClusterSpec(f"a100_{hosts * 8}", hosts, 8, A100, intra_gbytes_per_s=300.0, inter_gbytes_per_s=25.0)


def test_flops_follow_narayanan_eq3() -> None:
    b, s, l, h, v = 3072, 2048, 128, 25600, 51200
    eq3 = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert megatron_flops_per_step(GPT_1T) == pytest.approx(eq3, rel=1e-12)
    assert megatron_flops_per_step(GPT_1T, recompute=False) < eq3
    assert GPT_1T.parameters == pytest.approx(1008e9, rel=0.001)  # Table 1: 1008.0B


def test_ring_allreduce() -> None:
    link = Link(bandwidth=1e9, latency=0.0)
    assert ring_allreduce_s(1e9, 4, link) == pytest.approx(2 * 3 / 4)
    assert ring_allreduce_s(1e9, 1, link) == 0.0


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2), ("zb_h1", 1),
                                    ("zb_v", 2), ("dualpipev", 2)])
def test_extrapolated_simulation_matches_direct(name: str, v: int, monkeypatch) -> None:
    costs = {"F": 1.0, "B": 1.0, "W": 1.0, "comm": 0.2} if name in ("zb_h1", "zb_v", "dualpipev") else \
        {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.2}
    direct = simulate(build(name, 8, 48, v), costs)
    monkeypatch.setattr("pipegrid.plan.simulation._DIRECT_OPS", 0)
    approx = simulate_step(name, 8, 48, v, costs)
    assert approx.extrapolated_from == ((16, 24) if v == 2 and name != "interleaved_1f1b" else (8, 16))  # a V settles at 2p
    assert approx.makespan == pytest.approx(direct.makespan, rel=0.02)  # zb_h1 settles late: +1%
    assert approx.peak_inflight == direct.peak_inflight


@pytest.mark.parametrize("name", ["zb_v", "dualpipev"])
def test_the_v_schedules_closed_form_matches_the_simulator(name: str) -> None:
    """The planner's screen (registry hints) against the simulator it stands in for, m >= 2p."""
    from pipegrid.schedules import SCHEDULES

    hints = SCHEDULES[name].hints
    for f, b, w in [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 1.0, 0.1), (2.0, 1.0, 1.0)]:
        for p, m in [(4, 16), (8, 32)]:
            simulated = simulate(build(name, p, m, 2), {"F": f, "B": b, "W": w}).makespan
            assert hints.pipeline(p, m, 2, f, b, w) == pytest.approx(simulated, abs=f + b + w), (f, b, w, p, m)


def test_the_search_proposes_the_v_schedules_with_two_chunks() -> None:
    from pipegrid.plan.search import SearchSpace, candidates

    found = {(c.schedule, c.virtual_stages) for c in candidates(GPT_1T, _dgx(64), SearchSpace())}
    assert {("zb_v", 2), ("dualpipev", 2), ("zb_h1", 1), ("interleaved_1f1b", 4)} <= found
    assert not {(name, v) for name, v in found if name in ("zb_v", "dualpipev") and v != 2}


def test_inflight_follows_the_schedule() -> None:
    costs = {"F": 1.0, "B": 2.0, "W": 0.0, "comm": 0.0}
    p, m = 4, 6
    assert simulate_step("1f1b", p, m, 1, costs).peak_inflight == tuple(min(m, p - s) for s in range(p))
    assert simulate_step("gpipe", p, m, 1, costs).peak_inflight == (m,) * p


def test_split_chunks_puts_embedding_first_logits_last() -> None:
    layers = [LayerCost("embedding", 1)] + [LayerCost("block", 1) for _ in range(5)] + [LayerCost("logits", 1)]
    chunks = split_chunks(layers, 2)
    assert [len(c) for c in chunks] == [4, 3]
    assert chunks[0][0].name == "embedding" and chunks[-1][-1].name == "logits"
    with pytest.raises(ValueError, match="cannot fill"):
        split_chunks(layers, 6)


def test_memory_report_zero2_zero3_and_offload() -> None:
    two = memory_report(1000, OptimizerSpec("adam", "bfloat16"), data=4, zero=2)
    assert two["gradients"] == 250 * 4 and two["step_gradients"] == 1000 * 4 and two["buffers"] == 0
    # zero.reduce_every_micro_batch: the shard and about three buckets, each within one shard
    bucketed = memory_report(1000, OptimizerSpec("adam", "bfloat16"), data=4, zero=2, bucket_elements=50)
    assert bucketed["step_gradients"] == (250 + 150) * 4 and bucketed["total"] == two["total"]
    huge = memory_report(1000, OptimizerSpec(), data=4, zero=2, bucket_elements=10**6)
    assert huge["step_gradients"] == (250 + 750) * 4
    off = memory_report(1000, OptimizerSpec("adam", "bfloat16"), data=4, zero=2, offload=True)
    assert off["optimizer"] == off["master_weights"] == 0  # nothing of the optimizer on the device
    assert off["optimizer_host"] == 250 * 8 and off["master_weights_host"] == off["gradients_host"] == 250 * 4
    assert off["total"] == two["total"] - two["optimizer"] - two["master_weights"]
    three = memory_report(1000, OptimizerSpec("adam", "float32"), data=4, zero=3)
    assert three["parameters"] == 0 and three["step_parameters"] == 1000 * 4  # gathered only within a step
    assert three["master_weights"] == 250 * 4  # the fp32 shard, the parameters' one copy between steps


def test_memory_report_keys_and_zero() -> None:
    plain = memory_report(1000, OptimizerSpec("adam", "float32"))
    assert tuple(plain) == REPORT_KEYS
    assert plain == {"parameters": 4000, "gradients": 4000, "optimizer": 8000, "master_weights": 0,
                     "buffers": 0, "total": 16000}
    mixed = memory_report(1000, OptimizerSpec("adam", "bfloat16"), data=4, zero=True)
    assert mixed["parameters"] == 2000 and mixed["master_weights"] == 250 * 4
    assert mixed["optimizer"] == 250 * 8  # fp32 Adam slots, a quarter per data rank
    assert memory_report(1001, OptimizerSpec(), data=4, zero=True)["optimizer"] == 251 * 8  # padded


def test_small_model_memory_prediction() -> None:
    """The prediction side of engine.memory_report(): 8 linear blocks of 1000 parameters."""
    layers = [LayerCost("Block", 1000, forward_s=1e-3, backward_s=2e-3, activation_bytes=400,
                        checkpoint_bytes=100, output_bytes=100) for _ in range(8)]
    cluster = ClusterSpec("cpu", 1, 4, DeviceSpec(1e11, 2 ** 30, 1e10), 5.0, 5.0)
    pred = predict(layers, Candidate(pipe=2, data=2, zero=True), cluster, micro_batches=4)
    report = memory_report(4000, OptimizerSpec(), data=2, zero=True)
    assert {k: pred.memory[k] for k in REPORT_KEYS} == report
    assert pred.memory["activations"] == 2 * 4 * 400  # stage 0 of 1F1B: min(m, p) micro-batches
    assert pred.peak_memory_bytes == report["total"] + 3200


def test_zero2_and_zero3_predictions_count_what_a_step_holds_beside_the_activations() -> None:
    layers = [LayerCost("Block", 1000, forward_s=1e-3, backward_s=2e-3, activation_bytes=400,
                        checkpoint_bytes=100, output_bytes=100) for _ in range(8)]
    cluster = ClusterSpec("cpu", 1, 4, DeviceSpec(1e11, 2 ** 30, 1e10), 5.0, 5.0)
    one, two, three = (predict(layers, Candidate(pipe=2, data=2, zero=z), cluster, micro_batches=4) for z in (1, 2, 3))
    assert two.candidate.label().endswith("zero2") and three.step_s == two.step_s == one.step_s  # same traffic
    # in a step ZeRO-2 holds the full gradient buffer, ZeRO-3 the gathered parameters too: ZeRO-1's peak
    # without its reduce-scatter buffer
    assert two.peak_memory_bytes == one.peak_memory_bytes - one.memory["buffers"]
    # (in float32 ZeRO-3's master shard is a copy of its own: the parameters are freed between steps)
    assert three.peak_memory_bytes == two.peak_memory_bytes + three.memory["master_weights"]


def test_measured_profile_prediction_is_the_simulated_makespan() -> None:
    layers = [LayerCost("Block", 10, forward_s=1.0, backward_s=2.0) for _ in range(4)]
    cluster = ClusterSpec("cpu", 1, 2, DeviceSpec(1e11, 2 ** 30, 1e10), 5.0, 5.0, 0.0, 0.0)
    pred = predict(layers, Candidate(pipe=2), cluster, micro_batches=4)
    assert pred.pipeline_s == pytest.approx((4 + 2 - 1) * 6.0, rel=1e-6)  # (m + p - 1)(F + B)


@pytest.fixture(scope="module")
def published_1t():
    return predict_transformer(GPT_1T, PUBLISHED_1T, _dgx(384))


def test_published_1t_within_15_percent(published_1t) -> None:
    pred = published_1t
    assert pred.fits
    assert pred.hfu == pytest.approx(0.52, rel=0.15)  # 163 TFLOP/s of 312
    assert pred.tflops_per_device == pytest.approx(163, rel=0.15)


@pytest.mark.parametrize("layers,hidden,heads,t,p,gpus,batch,b,published", [
    (80, 12288, 96, 8, 8, 1536, 2304, 1, 0.47),   # 145.6B
    (40, 6144, 48, 8, 1, 256, 1024, 4, 0.43),     # 18.4B
])
def test_table1_smaller_models(layers, hidden, heads, t, p, gpus, batch, b, published) -> None:
    cfg = TransformerConfig("row", layers, hidden, heads, 2048, 51200, batch, "float16", True)
    layout = Candidate(pipe=p, data=gpus // (t * p), tensor=t, micro_batch_size=b,
                       schedule="interleaved_1f1b" if p > 1 else "1f1b", virtual_stages=2 if p > 1 else 1)
    assert predict_transformer(cfg, layout, _dgx(gpus // 8)).hfu == pytest.approx(published, rel=0.15)


def test_search_ranks_published_1t_or_explains(published_1t) -> None:
    ranked = search(GPT_1T, _dgx(384), top=3)
    assert ranked[1:] == sorted(ranked[1:], key=lambda pr: pr.step_s) and all(pr.fits for pr in ranked)
    assert choose(ranked).pick.candidate == ranked[0].candidate  # the pick first: on a tie, not the fastest
    if PUBLISHED_1T not in [pr.candidate for pr in ranked]:
        for pr in ranked:
            assert pr.step_s < published_1t.step_s
            assert "beats" in explain(pr, published_1t)


def test_cli_prints_a_table(capsys) -> None:
    from pipegrid.plan.__main__ import compose, main

    cfg = compose(["model=gpt_18b", "cluster=a100_64", "search.top=3", "search.shortlist=3"])
    assert model_from_dict(cfg["model"]).layers == 40
    main(["model=gpt_18b", "cluster=a100_64", "search.top=3", "search.shortlist=3"])
    out = capsys.readouterr().out
    assert "layout" in out and "HFU" in out and out.count("\n") >= 5


LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_inner": None}


@pytest.mark.parametrize("stored,billions", [(LLAMA_70B, 70.55), (GPT2_SMALL, 0.1244)])
def test_a_transformers_config_counts_its_parameters(tmp_path, stored, billions) -> None:
    """GQA, SwiGLU and an untied head (Llama-3-70B: 70.55B) or GPT's 12 h^2 blocks (GPT-2: 124M)."""
    (tmp_path / "config.json").write_text(json.dumps(stored))
    cfg = transformer_config_from_hf(str(tmp_path), seq_len=1024)
    assert cfg.parameters / 1e9 == pytest.approx(billions, rel=0.002)


def test_cli_plans_a_transformers_config(tmp_path, capsys) -> None:
    """``--hf-config``: the model read from config.json, tensor degrees that split its 8 key/value heads only."""
    from pipegrid.plan.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    main(["--hf-config", str(tmp_path / "config.json"), "cluster=a100_64", "model.seq_len=4096",
          "model.global_batch=128", "search.top=3", "search.shortlist=3"])
    out = capsys.readouterr().out
    assert out.startswith("llama (70.6B parameters") and "layout" in out
    cfg = transformer_config_from_hf(str(tmp_path), seq_len=4096)
    assert cfg.splits_over(8) and not cfg.splits_over(16)
    with pytest.raises(ValueError, match=r"gives no \['layers'"):
        (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
        transformer_config_from_hf(str(tmp_path / "bad.json"))


def test_sequence_parallel_splits_what_tensor_parallelism_leaves_whole(tmp_path, capsys) -> None:
    """Korthikanti et al. eq. 2 -> eq. 4: a block's stored activations s b h (10 + 24/t + 5as/(ht))
    become s b h (34/t + 5as/(ht)) (16-bit); its stage message and checkpoint are 1/t; tensor 1 is unchanged."""
    from dataclasses import replace

    from pipegrid.plan.__main__ import main
    from pipegrid.plan.model import transformer_layers

    s, b, h, a, t = 2048, 1, 8192, 64, 8
    cfg = TransformerConfig("llama", 80, h, a, s, 128256, 64, "bfloat16", True, kv_heads=8)
    plain, sp = (transformer_layers(c, b, t)[1] for c in (cfg, replace(cfg, sequence_parallel=True)))
    assert plain.activation_bytes == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert sp.activation_bytes == pytest.approx(s * b * h * (34 / t + 5 * a * s / (h * t)))
    assert sp.output_bytes == plain.output_bytes / t and sp.checkpoint_bytes == plain.checkpoint_bytes / t
    assert sp.forward_flops == plain.forward_flops and sp.tensor_allreduce_bytes == plain.tensor_allreduce_bytes
    one = [transformer_layers(c, b, 1)[1] for c in (cfg, replace(cfg, sequence_parallel=True))]
    assert one[0] == one[1]  # nothing to split at tensor 1
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    main(["--hf-config", str(tmp_path / "config.json"), "cluster=a100_64", "model.seq_len=4096",
          "model.global_batch=128", "model.sequence_parallel=true", "search.top=3", "search.shortlist=3"])
    assert "layout" in capsys.readouterr().out
