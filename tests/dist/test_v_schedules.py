"""zb_v and dualpipev train exactly like one process (design.md invariant 1): pipe 2, 3 and 4,
pipe x data with ZeRO-1, odd micro-batch counts, the tied embedding and head sharing one
parameter on rank 0 of the V, eval outputs on that rank, and a measured trace. The V posts
a receive before the send its peer is waiting for in one group (``0SA0+3RA0``); where that
receive must wait for its shape header first, the group's send leaves before it (m=1 and
``comm.dynamic_shapes`` hung without that).

Every case of one world size runs in one ``run_local`` call; the references (pipegrid's
``build_reference`` as in test_engine_equivalence, and the plain-torch model of
tests/support/reference.py) run in this process.
"""

from __future__ import annotations

import json

import pytest
import torch

import pipegrid as pg
from pipegrid.launch import run_local
from tests.support.engine_cases import (N_LAYER, STEPS, assert_matches_reference, canonical_state, config,
                                        global_batches, run_reference)
from tests.support.models import TinyGPT, gpt_batches
from tests.support.reference import PlainTinyGPT, evaluate, train

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "eps": 1e-5}  # eps: see test_zero_precision.py


def _case(schedule: str, pipe: int, data: int, m: int, *, zero: int = 0, optimizer: dict | None = None,
          evaluate: bool = False, dynamic: bool = False, coalesce: int = 1) -> dict:
    cfg = config(schedule, pipe, data, m, optimizer=optimizer, zero={"stage": zero}, coalesce=coalesce,
                 comm={"timeout_s": 60, "dynamic_shapes": dynamic})
    return {"cfg": cfg, "evaluate": evaluate}


def _eval_batches(data: int, m: int) -> list:
    return gpt_batches(data * m, seed=7)  # data rank d evaluates micro-batches d*m .. (d+1)*m - 1


CASES = {
    "zb_v-p2-m3": _case("zb_v", 2, 1, 3, evaluate=True),
    "zb_v-p2-m1": _case("zb_v", 2, 1, 1),  # fewer micro-batches than the V's warm-up
    "dualpipev-p2-m5": _case("dualpipev", 2, 1, 5, evaluate=True),
    "zb_v-p2-m6-coalesce2": _case("zb_v", 2, 1, 6, coalesce=2),
    "zb_v-p3-m5": _case("zb_v", 3, 1, 5),
    "zb_v-p3-m5-headers": _case("zb_v", 3, 1, 5, dynamic=True),  # a header before every activation
    "dualpipev-p3-m7": _case("dualpipev", 3, 1, 7),
    "zb_v-p4-m7": _case("zb_v", 4, 1, 7),
    "dualpipev-p4-m9": _case("dualpipev", 4, 1, 9),
    "zb_v-p2xd2-zero1": _case("zb_v", 2, 2, 3, zero=1, optimizer=ADAM, evaluate=True),
    "dualpipev-p2xd2-zero1": _case("dualpipev", 2, 2, 5, zero=1, optimizer=ADAM),
}


def _world(case: dict) -> int:
    return case["cfg"]["topology"]["pipe"] * case["cfg"]["topology"]["data"]


# ---- on every rank -----------------------------------------------------------------------

def _run(case: dict) -> dict:
    cfg = case["cfg"]
    topo = pg.Topology(**cfg["topology"])
    model = TinyGPT(N_LAYER, topology=topo, virtual_stages=2, stage_placement="v")
    engine = pg.initialize(model, cfg)
    data, m = engine.groups.coord.data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(global_batches(step, topo.data, m)[data * m:(data + 1) * m]))
              for step in range(STEPS)]
    tied = engine.module.tied_parameters("embed")
    result = {"losses": losses, "state": canonical_state(engine.module), "data_rank": data,
              "stages": engine.module.stage_ids, "tied": (len(tied), len(engine.update._tied_groups)),
              "tied_shared": all(any(p is q for q in engine.module.stage_module(s).parameters())
                                 for s in engine.module.stage_ids for p in tied)}
    if case["evaluate"]:
        result["eval"] = engine.eval_batch(iter(_eval_batches(topo.data, m)[data * m:(data + 1) * m]),
                                           return_outputs=True)
    return result


def _run_all(cases: dict[str, dict]) -> dict[str, dict]:
    return {name: _run(case) for name, case in cases.items()}


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for world in sorted({_world(case) for case in CASES.values()}):
        cases = {name: case for name, case in CASES.items() if _world(case) == world}
        per_rank = run_local(_run_all, world, (cases,), timeout_s=300)
        out.update({name: [rank[name] for rank in per_rank] for name in cases})
    return out


# ---- in the test process ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process(results, name):
    cfg = CASES[name]["cfg"]
    assert_matches_reference(results[name], run_reference(cfg), rtol=1e-5, atol=1e-6)
    data, m = cfg["topology"]["data"], cfg["schedule"]["micro_batches"]
    plain = train(PlainTinyGPT(N_LAYER), [global_batches(s, data, m) for s in range(STEPS)], cfg["optimizer"],
                  cfg["train"]["grad_clip"])  # and a model written in plain torch
    assert_matches_reference(results[name], plain, rtol=1e-5, atol=1e-6)


def test_the_v_places_stages_and_shares_the_tied_weight_on_rank_0(results):
    per_rank = results["zb_v-p3-m5"]
    assert [r["stages"] for r in per_rank] == [[0, 5], [1, 4], [2, 3]]
    first = per_rank[0]
    assert first["tied"] == (1, 0) and first["tied_shared"]  # one parameter, no tied all-reduce
    assert all(r["tied"] == (0, 0) for r in per_rank[1:])


@pytest.mark.parametrize("name", ["zb_v-p2-m3", "dualpipev-p2-m5", "zb_v-p2xd2-zero1"])
def test_eval_outputs_come_from_rank_0_of_the_v(results, name):
    """After training, as the plain model trained alike evaluates."""
    cfg = CASES[name]["cfg"]
    data, m = cfg["topology"]["data"], cfg["schedule"]["micro_batches"]
    model = PlainTinyGPT(N_LAYER)
    train(model, [global_batches(s, data, m) for s in range(STEPS)], cfg["optimizer"], cfg["train"]["grad_clip"])
    want_loss, want_outputs = evaluate(model, _eval_batches(data, m))
    holders = []
    for rank, result in enumerate(results[name]):
        loss, outputs = result["eval"]
        assert loss == pytest.approx(want_loss, rel=1e-5), f"rank {rank}"
        if outputs is not None:
            holders.append(rank)
            d = result["data_rank"]
            for got, want in zip(outputs, want_outputs[d * m:(d + 1) * m], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    topo = pg.Topology(**cfg["topology"])
    assert holders == [topo.rank(pipe=0, data=d, tensor=0) for d in range(data)]  # the V's last stage: pipe rank 0


def _traced(path: str) -> dict:
    cfg = config("zb_v", 2, 1, 4, trace={"enabled": True})
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2), virtual_stages=2, stage_placement="v"),
                           cfg)
    for step in range(2):
        engine.train_batch(iter(global_batches(step, 1, 4)))
    labels = [label for _, label, _, _ in engine.last_timeline()]
    return {"bubbles": engine.write_trace(path), "labels": labels,
            "stream": [str(op) for op in engine.schedule.streams[engine.pipe_rank]]}


def test_a_traced_v_step_runs_its_stream_and_draws_both_timelines(tmp_path):
    path = tmp_path / "zb_v.json"
    per_rank = run_local(_traced, 2, (str(path),), timeout_s=120)
    for result in per_rank:
        assert result["labels"] == result["stream"]  # the executor ran the stream verbatim, loss marks too
    assert any("*" in label for label in per_rank[1]["labels"])  # rank 1 receives the loss
    bubbles = per_rank[0]["bubbles"]
    assert 0.0 <= bubbles["simulated_bubble"] < 1.0 and 0.0 <= bubbles["measured_bubble"] < 1.0
    assert json.loads(path.read_text())["traceEvents"] and (tmp_path / "zb_v.png").stat().st_size > 5000


def _save_in_a_v_load_in_a_loop(directory: str) -> tuple[dict, dict]:
    """Weights saved by a V-placed zb_v run (embedding and head on rank 0) load into 1f1b's layout."""
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2), virtual_stages=2, stage_placement="v"),
                           config("zb_v", 2, 1, 3))
    engine.train_batch(iter(global_batches(0, 1, 3)))
    saved = canonical_state(engine.module)
    engine.save_checkpoint(directory)
    loop = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2)), config("1f1b", 2, 1, 3))
    assert loop.load_checkpoint(directory, load_optimizer_states=False) == 1
    return saved, canonical_state(loop.module)


def test_weights_saved_under_zb_v_load_under_1f1b(tmp_path):
    per_rank = run_local(_save_in_a_v_load_in_a_loop, 2, (str(tmp_path),), timeout_s=120)
    saved = {k: v for s, _ in per_rank for k, v in s.items()}
    loaded = {k: v for _, s in per_rank for k, v in s.items()}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
