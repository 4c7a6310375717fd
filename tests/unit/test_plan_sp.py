"""Planner and sequence parallelism (``Candidate.sequence_parallel``): eq. 4 activations and 1/t
messages from the candidate's flag, the same ring bytes per tensor-parallel pair plus the backward
re-gathers (overlapped only where the device overlaps), and the search proposing SP on GPUs where it
ties or is needed to fit, on CPU gloo only where it is needed to fit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipegrid.plan import (
    Candidate, ClusterSpec, DeviceSpec, LayerCost, TransformerConfig, choose, predict, predict_transformer, search,
    transformer_layers,
)
from pipegrid.plan.__main__ import compose, main
from pipegrid.plan.collectives import ring_allgather_s, ring_allreduce_s, sequence_regather_s, tensor_comm_s
from pipegrid.plan.hardware import Link
from pipegrid.plan.presets import cluster_from_dict, model_from_dict
from pipegrid.plan.search import SearchSpace

A100 = DeviceSpec(peak_flops=312e12, memory_bytes=80 * 2 ** 30, memory_bandwidth=2039e9)
GLOO = DeviceSpec(1e11, 2 ** 30, 1e10, overlaps_comm=False, reduce_scatter_allreduces=True)
# 2 devices: the layouts are d=2, p=2 and t=2; no recomputation, so activations dominate memory
SMALL = TransformerConfig("small", layers=4, hidden=1024, heads=16, seq_len=2048, vocab=8192, global_batch=8,
                          recompute=False)
ONE_SCHEDULE = SearchSpace(schedules=("1f1b",), micro_batch_sizes=(1,), zero=(False,), widen=False)


def test_the_flag_needs_tensor_parallelism():
    with pytest.raises(ValueError, match="set tensor >= 2 or sequence_parallel=False"):
        Candidate(pipe=2, sequence_parallel=True)


def test_a_candidate_says_sp_in_its_label_and_overrides():
    candidate = Candidate(pipe=2, tensor=4, sequence_parallel=True)
    assert candidate.label().endswith(" sp")
    assert candidate.overrides(8)[-1] == "model.sequence_parallel=true"
    assert "sequence_parallel" not in " ".join(Candidate(pipe=2, tensor=4).overrides())


def test_memory_follows_the_candidates_flag():
    b, s, h, a, t = 2, SMALL.seq_len, SMALL.hidden, SMALL.heads, 4
    plain, sp = (transformer_layers(SMALL, b, t, flag)[1] for flag in (False, True))
    # Korthikanti et al. eq. 2 and eq. 4 (16-bit): s b h (10 + 24/t + 5as/(ht)) and s b h (34/t + 5as/(ht))
    assert plain.activation_bytes == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert sp.activation_bytes == pytest.approx(s * b * h * (34 / t + 5 * a * s / (h * t)))
    assert (sp.output_bytes, sp.checkpoint_bytes) == (plain.output_bytes / t, plain.checkpoint_bytes / t)
    assert (plain.sequence_regathers, sp.sequence_regathers) == (0, 2)
    forced = replace(SMALL, sequence_parallel=True)
    assert transformer_layers(forced, b, t)[1] == sp  # the config's field is the default
    assert transformer_layers(forced, b, 1)[1] == transformer_layers(SMALL, b, 1)[1]  # nothing to split at t=1


def test_a_forcing_config_turns_it_on_in_every_tensor_parallel_candidate():
    cluster = ClusterSpec("a100_2", 1, 2, A100, 300.0, 25.0)
    forced = replace(SMALL, sequence_parallel=True)
    assert predict_transformer(forced, Candidate(pipe=1, tensor=2), cluster).candidate.sequence_parallel
    ranked = search(forced, cluster, ONE_SCHEDULE)
    assert all(pr.candidate.sequence_parallel == (pr.candidate.tensor > 1) for pr in ranked)


def test_the_re_gather_arithmetic():
    link, nbytes, t = Link(bandwidth=1e9, latency=1e-5), 4e6, 4
    layer = LayerCost("block", 0, tensor_allreduce_bytes=nbytes, tensor_allreduces=2, sequence_regathers=2)
    gather = 3 / 4 * nbytes / 1e9 + 3 * 1e-5
    assert ring_allgather_s(nbytes, t, link) == pytest.approx(gather)
    assert 2 * gather == pytest.approx(ring_allreduce_s(nbytes, t, link))  # the pair is the all-reduce's bytes
    assert tensor_comm_s(layer, t, link, A100) == pytest.approx(2 * ring_allreduce_s(nbytes, t, link))
    assert tensor_comm_s(layer, t, link, GLOO) == pytest.approx(2 * (gather + 2 * gather))  # gloo's scatter
    assert sequence_regather_s(layer, t, link, GLOO, gemm_s=1.0) == pytest.approx(2 * gather)  # never hidden
    assert sequence_regather_s(layer, t, link, A100, gemm_s=1.0) == 0.0  # under the dX GEMMs
    assert sequence_regather_s(layer, t, link, A100, gemm_s=gather) == pytest.approx(gather)  # what sticks out


def test_predict_charges_the_re_gathers_to_backward_where_nothing_overlaps():
    """Measured layers, one rank pair: SP's backward costs the gloo pair's extra half all-reduce per
    region plus two all-gathers; the forward the extra half all-reduces only."""
    cluster = ClusterSpec("gloo_2", 1, 2, GLOO, 5.0, 5.0)
    nbytes = 1e6
    layers = [LayerCost("Block", 100, forward_s=1e-3, backward_s=2e-3, output_bytes=nbytes,
                        tensor_allreduce_bytes=nbytes, tensor_allreduces=2, sequence_regathers=regathers)
              for regathers in (0, 2)]
    plain, sp = (predict([layer], candidate, cluster, micro_batches=1).costs
                 for layer, candidate in zip(layers, (Candidate(1, tensor=2), Candidate(1, tensor=2,
                                                                                        sequence_parallel=True))))
    link = cluster.links()[0]
    half = ring_allgather_s(nbytes, 2, link)
    assert sp["F"] - plain["F"] == pytest.approx(2 * half)
    assert sp["B"] - plain["B"] == pytest.approx(2 * half + 2 * half)


def test_on_a_gpu_cluster_the_pick_has_sp_with_the_note_and_the_override():
    cfg = compose(["model=gpt_18b", "cluster=a100_64"])
    model, cluster = model_from_dict(cfg["model"]), cluster_from_dict(cfg["cluster"])
    space = SearchSpace(schedules=("1f1b", "zb_h1"), micro_batch_sizes=(1,), zero=(True,), shortlist=4)
    pick = search(model, cluster, space, top=4)[0]
    assert pick.candidate.tensor > 1 and pick.candidate.sequence_parallel
    assert "model.sequence_parallel=true" in pick.candidate.overrides(pick.micro_batches)
    assert any("sequence parallelism (model.sequence_parallel=true" in note for note in pick.notes)
    # against its own twin it ties or wins, and the memory tie-break takes it
    plain = predict_transformer(model, replace(pick.candidate, sequence_parallel=False), cluster)
    assert pick.step_s <= plain.step_s * 1.06 and pick.peak_memory_bytes < plain.peak_memory_bytes
    assert choose([plain, pick], within=1.0).pick.candidate.sequence_parallel  # even at a wide tie band
    assert "less memory" in choose([plain, pick], within=1.0).reason


def _peaks(device: DeviceSpec) -> tuple[float, float]:
    """(SP peak at t=2, smallest peak of any layout without SP) on two devices."""
    cluster = ClusterSpec("two", 1, 2, device, 300.0, 25.0)
    plain = [Candidate(1, 2, 1), Candidate(2, 1, 1), Candidate(1, 1, 2)]
    smallest = min(predict_transformer(SMALL, c, cluster).peak_memory_bytes for c in plain)
    return predict_transformer(SMALL, Candidate(1, 1, 2, sequence_parallel=True), cluster).peak_memory_bytes, smallest


@pytest.mark.parametrize("device", [A100, GLOO], ids=["gpu", "cpu_gloo"])
def test_where_only_sp_fits_it_is_proposed(device):
    sp_peak, smallest = _peaks(device)
    assert sp_peak < smallest, "the case needs SP to save more than any other layout"
    tight = ClusterSpec("two", 1, 2, replace(device, memory_bytes=(sp_peak + smallest) / 2), 300.0, 25.0)
    ranked = search(SMALL, tight, ONE_SCHEDULE)
    assert [pr.candidate for pr in ranked] == [Candidate(1, 1, 2, micro_batch_size=1, sequence_parallel=True)]
    assert any("which does not fit" in note for note in ranked[0].notes)


def test_on_cpu_gloo_sp_is_not_proposed_when_the_layout_fits_without():
    roomy = ClusterSpec("two", 1, 2, replace(GLOO, memory_bytes=64 * 2 ** 30), 5.0, 5.0)
    ranked = search(SMALL, roomy, ONE_SCHEDULE)
    assert any(pr.candidate.tensor == 2 for pr in ranked)
    assert not any(pr.candidate.sequence_parallel for pr in ranked)
    gpu = ClusterSpec("two", 1, 2, replace(A100, memory_bytes=64 * 2 ** 30), 300.0, 25.0)
    assert any(pr.candidate.sequence_parallel for pr in search(SMALL, gpu, ONE_SCHEDULE))


def test_the_cli_runs_the_pick_with_sequence_parallelism(capsys):
    main(["model=gpt_18b", "cluster=a100_64", "search.top=2", "search.schedules=[1f1b]",
          "search.micro_batch_sizes=[1]", "search.zero=[true]", "search.shortlist=2"])
    out = capsys.readouterr().out
    assert "sequence parallelism (model.sequence_parallel=true; a pipegrid.hf model" in out
    run = next(line for line in out.splitlines() if line.startswith("run rank 1 with:"))
    assert "model.sequence_parallel=true" in run
