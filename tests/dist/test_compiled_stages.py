"""compile.enabled on gloo: compiled stages train exactly like eager ones and like one plain-torch
process, under every schedule (the split-backward ones included), at pipe 2 and pipe 2 x data 2,
with the tied embedding/head, activation checkpointing, a transformers Llama, and a new sequence
length mid-run.

Compiling on 2 shared cores is the cost here: the schedule matrix uses backend aot_eager (dynamo and
AOTAutograd trace as inductor would, no code generated), one case runs inductor itself; every
case of a grid runs in one ``run_local`` call, so a worker compiles each layer class once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid import hf
from pipegrid.launch import run_local
from pipegrid.schedules import SCHEDULES, ScheduleError, build
from tests.support.engine_cases import (
    N_LAYER,
    assert_matches_reference,
    canonical_state,
    config,
    global_batches,
    run_reference,
)
from tests.support.hf_models import (
    ATTN,
    assert_ranks_match,
    lm_batches,
    load_reference,
    reference_step,
    save_tiny,
)
from tests.support.models import TinyGPT, gpt_batches, mlp_batches, mlp_layers, mse_loss

# non-split schedules first: a split backward turns AOTAutograd's donated buffers off, which drops
# the compiled code once (pipe/compile.py), so a worker switches once, not per schedule
ORDER = ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v", "dualpipev"]
AOT = {"enabled": True, "backend": "aot_eager"}
RTOL, ATOL = 1e-5, 1e-6


def _accepted(schedule: str, pipe: int, m: int) -> bool:
    try:
        build(schedule, pipe, m, (SCHEDULES[schedule].chunks or (2,))[0])
        return True
    except ScheduleError:
        return False


MLP_DEPTH = 2


def _run(cfg: dict) -> dict:
    """tests.support.engine_cases.run_pipeline, with ZeRO-3's parameters gathered before they are read (it frees them after a step)."""
    topo = pg.Topology(**cfg["topology"])
    model = TinyGPT(N_LAYER, topology=topo, virtual_stages=cfg["schedule"]["virtual_stages"],
                    stage_placement=SCHEDULES[cfg["schedule"]["name"]].placement or "loop")
    engine = pg.initialize(model, cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(global_batches(s, topo.data, m)[d * m:(d + 1) * m])) for s in range(3)]
    engine.gather_parameters()
    return {"losses": losses, "state": canonical_state(engine.module)}


def _compiled_and_eager(configs: list[dict]) -> list[tuple[dict, dict]]:
    return [(_run({**cfg, "compile": AOT}), _run(cfg)) for cfg in configs]


def _assert_same(compiled: dict, eager: dict, where: str) -> None:
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{where} losses: {m}")
    for name, value in eager["state"].items():
        torch.testing.assert_close(compiled["state"][name], value, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{where} parameter {name}: {m}")


def _checkpointed(cfg: dict) -> dict:
    """_run's model with activation checkpointing every layer."""
    topo = pg.Topology(**cfg["topology"])
    placement = SCHEDULES[cfg["schedule"]["name"]].placement or "loop"
    model = TinyGPT(N_LAYER, topology=topo, virtual_stages=cfg["schedule"]["virtual_stages"],
                    stage_placement=placement, activation_checkpoint_interval=1)
    engine = pg.initialize(model, cfg)
    d, m = topo.coord(dist.get_rank()).data, cfg["schedule"]["micro_batches"]
    losses = [engine.train_batch(iter(global_batches(s, topo.data, m)[d * m:(d + 1) * m])) for s in range(3)]
    return {"losses": losses, "state": canonical_state(engine.module)}


def _lengths(compile_section: dict | None) -> dict:
    """Steps at sequence lengths 6, 5, 4 (comm.dynamic_shapes); the losses and this rank's parameters."""
    cfg = config("zb_h1", 2, 1, 2, comm={"timeout_s": 60, "dynamic_shapes": True})
    if compile_section:
        cfg["compile"] = compile_section
    engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2)), cfg)
    losses = [engine.train_batch(iter(gpt_batches(2, seq_len=t, seed=t))) for t in (6, 5, 4)]
    return {"losses": losses, "state": canonical_state(engine.module)}


def _said_again(run: Any) -> tuple[Any, list[str]]:
    """``run()`` and the pipegrid log lines that say a layer compiles again."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipegrid").addHandler(handler)
    try:
        return run(), [r for r in records if "compiles again" in r]
    finally:
        logging.getLogger("pipegrid").removeHandler(handler)


def _pipe2_cases(configs: list[dict], checkpointed: list[dict]) -> dict:
    """Every case of the pipe-2 grid in one worker, so each layer class compiles once per backward kind."""
    matrix = _compiled_and_eager(configs)  # ends with split backwards, as do the next two
    lengths, said = _said_again(lambda: (_lengths(AOT), _lengths(None)))
    return {"matrix": matrix, "lengths": lengths, "said": said,
            "checkpointed": [_checkpointed(c) for c in checkpointed]}


def test_pipe2_every_schedule_checkpointing_and_new_lengths():
    """All six schedules compiled = eager = one process; every layer checkpointed under zb_v and 1f1b
    (whose split backward then takes the weights with I); sequence lengths 6, 5, 4 in one run train as
    eager does and each layer says once that it compiles again."""
    configs = [config(s, 2, 1, 4) for s in ORDER if _accepted(s, 2, 4)]
    assert [c["schedule"]["name"] for c in configs] == ORDER
    checkpointed = [config(s, 2, 1, 4, compile=AOT) for s in ("zb_v", "1f1b")]
    per_rank = run_local(_pipe2_cases, 2, (configs, checkpointed), timeout_s=400)
    _check_matrix(configs, [r["matrix"] for r in per_rank])
    for i, cfg in enumerate(checkpointed):
        assert_matches_reference([r["checkpointed"][i] for r in per_rank], run_reference(cfg), rtol=RTOL, atol=ATOL)
    for rank, result in enumerate(per_rank):
        _assert_same(*result["lengths"], f"lengths 6, 5, 4 rank {rank}")
        layers = [line.split(" layer ")[1].split(" ")[0] for line in result["said"]]
        assert result["said"] and len(layers) == len(set(layers)), result["said"]  # once per layer


def _check_matrix(configs: list[dict], per_rank: list[list[tuple[dict, dict]]]) -> None:
    for i, cfg in enumerate(configs):
        name = cfg["schedule"]["name"]
        for rank, results in enumerate(per_rank):
            _assert_same(*results[i], f"{name} rank {rank}")
        assert_matches_reference([results[i][0] for results in per_rank], run_reference(cfg), rtol=RTOL, atol=ATOL)


def test_pipe2_data2_every_schedule_and_zero3():
    """All six schedules, then ZeRO-3 under zb_v (parameters sharded over data, gathered each step)."""
    configs = [config(s, 2, 2, 4) for s in ORDER if _accepted(s, 2, 4)]
    assert [c["schedule"]["name"] for c in configs] == ORDER
    configs.append(config("zb_v", 2, 2, 4, zero={"stage": 3}))
    _check_matrix(configs, run_local(_compiled_and_eager, 4, (configs,), timeout_s=400))


def _mlp_run(cfg: dict) -> dict:
    engine = pg.initialize(pg.PipelineModule(mlp_layers(MLP_DEPTH), loss_fn=mse_loss, topology=pg.Topology(pipe=2)),
                           cfg)
    losses = [engine.train_batch(iter(mlp_batches(4, seed=s))) for s in range(3)]
    return {"losses": losses, "state": canonical_state(engine.module)}


def _mlp_reference() -> dict:
    model = pg.build_reference(mlp_layers(MLP_DEPTH), loss_fn=mse_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(3):
        batches = mlp_batches(4, seed=step)
        total = 0.0
        for x, y in batches:
            loss = mse_loss(model(x), y)
            (loss / len(batches)).backward()
            total += loss.item()
        losses.append(total / len(batches))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "state": canonical_state(model)}


def test_inductor_under_a_split_backward_matches_one_process():
    """inductor itself (C++ generated for the CPU, its on-disk cache shared by the ranks and later
    runs) under zb_h1: compiled regions between eager Linear layers, their W deferred."""
    cfg = config("zb_h1", 2, 1, 4, compile={"enabled": True})
    per_rank = run_local(_mlp_run, 2, (cfg,), timeout_s=400)
    assert_matches_reference(per_rank, _mlp_reference(), rtol=RTOL, atol=ATOL)


def _hf_train(directory: str, save: str) -> dict:
    cfg = {"topology": {"pipe": 2}, "schedule": {"name": "zb_h1", "micro_batches": 2},
           "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.5}, "train": {"grad_clip": 0.5},
           "comm": {"timeout_s": 60}, "compile": AOT}
    model = hf.from_pretrained(directory, topology=pg.Topology(pipe=2), attn_implementation=ATTN)
    engine = pg.initialize(model, cfg)
    losses = [engine.train_batch(iter(lm_batches(2, seed=100 + s, padded=True))) for s in range(3)]
    hf.save_pretrained(engine, save)
    tensors = {key: t.detach().clone() for stage in model.stage_ids
               for _, layer in model.local_layers(stage) for key, t in layer.hf_tensors()}
    return {"losses": losses, "tensors": tensors, "compiled": sorted(engine.compiler.compiled.values())}


def test_transformers_llama_compiled_trains_and_saves_like_transformers(tmp_path):
    directory = save_tiny("llama", str(tmp_path / "llama"))
    per_rank = run_local(_hf_train, 2, (directory, str(tmp_path / "saved")), timeout_s=300)
    reference = load_reference(directory).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses = [reference_step(reference, lm_batches(2, seed=100 + s, padded=True), optimizer, 0.5) for s in range(3)]
    assert_ranks_match("llama compiled zb_h1", per_rank, losses, reference.state_dict(), False, RTOL, ATOL)
    assert {"Embedding", "EmbeddingPrefix", "DecoderLayer", "FinalNorm", "LMHead"} == \
        {name for r in per_rank for name in r["compiled"]}
    saved = load_reference(str(tmp_path / "saved"))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[key], value, rtol=RTOL, atol=ATOL, msg=key)
