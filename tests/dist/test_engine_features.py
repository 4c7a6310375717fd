"""Engine behaviour beyond equivalence: shapes, eval, data errors, traces, LR schedulers."""

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.schedules import instructions as ins
from pipegrid.launch import WorkerError, run_local
from pipegrid.schedules import Exchange, build
from tests.support.engine_cases import (N_LAYER, assert_matches_reference, canonical_state, config, global_batches,
                                        run_reference)
from tests.support.models import TinyGPT, cross_entropy, gpt_batches, gpt_layers


def _engine(cfg):
    topo = pg.Topology(**cfg["topology"])
    model = TinyGPT(N_LAYER, topology=topo, virtual_stages=cfg["schedule"]["virtual_stages"])
    return pg.initialize(model, cfg)


def _grid_from_the_module(steps):
    """One engine per config kind, none of which names the grid; the module says pipe=2 x 2 chunks."""
    from omegaconf import OmegaConf

    from pipegrid.conf.schema import to_train_config

    full = config("interleaved_1f1b", 2, 1, 2)
    tree = {**full, "schedule": {k: v for k, v in full["schedule"].items() if k != "virtual_stages"}}
    del tree["topology"]
    results = {}
    for kind, cfg in (("dict", tree), ("DictConfig", OmegaConf.create(tree)), ("TrainConfig", to_train_config(tree))):
        engine = pg.initialize(TinyGPT(N_LAYER, topology=pg.Topology(pipe=2), virtual_stages=2), cfg)
        layout = (engine.topology.pipe, engine.topology.data, engine.config.schedule.virtual_stages)
        losses = [engine.train_batch(iter(global_batches(step, 1, 2))) for step in range(steps)]
        results[kind] = (layout, losses)
    return results


def test_the_grid_comes_from_the_module_for_every_config_kind():
    steps = 2
    results = run_local(_grid_from_the_module, 2, (steps,), timeout_s=60)
    reference = run_reference(config("interleaved_1f1b", 2, 1, 2), steps=steps)["losses"]
    for rank, by_kind in enumerate(results):
        assert sorted(by_kind) == ["DictConfig", "TrainConfig", "dict"]
        for kind, (layout, losses) in by_kind.items():
            assert layout == (2, 1, 2), (rank, kind)
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6)


def _dynamic_batches(step):
    """A new sequence length every step and every micro-batch: (6, 5, 6), (4, 3, 4), (5, 4, 5)."""
    seq_len = (6, 4, 5)[step]
    return [gpt_batches(1, seq_len=seq_len - k % 2, seed=10 * step + k)[0] for k in range(3)]


def _dynamic_shapes(cfg, steps):
    engine = _engine(cfg)
    losses = [engine.train_batch(iter(_dynamic_batches(step))) for step in range(steps)]
    return {"losses": losses, "state": canonical_state(engine.module)}


def _dynamic_shapes_reference(cfg, steps):
    """One process, plain torch: the same micro-batches by gradient accumulation, SGD, clipping."""
    model = pg.build_reference(gpt_layers(N_LAYER), loss_fn=cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["optimizer"]["lr"], momentum=cfg["optimizer"]["momentum"])
    losses = []
    for step in range(steps):
        batches, total = _dynamic_batches(step), 0.0
        for ids, labels in batches:
            loss = cross_entropy(model(ids), labels)
            (loss / len(batches)).backward()
            total += loss.item()
        losses.append(total / len(batches))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train"]["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "state": canonical_state(model)}


def test_dynamic_shapes_train_like_the_reference_with_changing_sequence_length():
    cfg, steps = config("1f1b", 2, 1, 3, comm={"dynamic_shapes": True, "timeout_s": 30}), 3
    results = run_local(_dynamic_shapes, 2, (cfg, steps), timeout_s=60)
    assert_matches_reference(results, _dynamic_shapes_reference(cfg, steps), rtol=1e-5, atol=1e-6)


def _changed_shape():
    engine = _engine(config("1f1b", 2, 1, 2))
    engine.train_batch(iter(gpt_batches(2, seq_len=6)))
    engine.train_batch(iter(gpt_batches(2, seq_len=4)))


def test_changed_shape_is_refused_by_the_sender():
    with pytest.raises(WorkerError) as info:
        run_local(_changed_shape, 2, timeout_s=30)
    message = str(info.value)
    assert info.value.rank == 0
    assert "stage 0 sends [float32[2, 4, 8], bool[4, 4]] to stage 1" in message
    assert "set up for [float32[2, 6, 8], bool[6, 6]]" in message and "comm.dynamic_shapes=true" in message


def _eval_outputs():
    engine = _engine(config("interleaved_1f1b", 2, 1, 2))
    batches = gpt_batches(2)
    loss, outputs = engine.eval_batch(iter(batches), return_outputs=True)
    train_loss = engine.train_batch(iter(batches))  # train and eval interleave freely
    loss_again = engine.eval_batch(iter(batches))
    return dist.get_rank(), loss, outputs, train_loss, loss_again


def test_eval_batch_returns_every_micro_batch_output_on_the_last_stage():
    results = run_local(_eval_outputs, 2, timeout_s=60)
    reference = pg.build_reference(gpt_layers(N_LAYER), loss_fn=cross_entropy)
    batches = gpt_batches(2)
    with torch.no_grad():
        expected = [reference(ids) for ids, _ in batches]
        expected_loss = sum(cross_entropy(o, y).item() for o, (_, y) in zip(expected, batches)) / 2
    (_, loss0, out0, train0, again0), (_, loss1, out1, _, _) = results
    assert out0 is None and len(out1) == 2
    for got, want in zip(out1, expected):
        torch.testing.assert_close(got, want)
    assert loss0 == pytest.approx(expected_loss) and loss1 == pytest.approx(expected_loss)
    assert train0 == pytest.approx(expected_loss)  # the same weights before the step
    assert again0 < loss0  # and the step helped


def _internal_error_in_a_send():
    engine = _engine(config("1f1b", 2, 1, 2, comm={"timeout_s": 5}))
    if dist.get_rank() == 0:  # not a transport failure: an error of pipegrid's (or a user's) own
        def broken(op):
            if any(ins.is_send(part) for part in ins.parts(op)):
                raise RuntimeError("packing stage 0's output failed (an internal error)")
        engine.before_instruction = broken
    engine.train_batch(iter(gpt_batches(2)))


def test_an_internal_error_around_a_send_keeps_its_own_type_and_words():
    with pytest.raises(WorkerError) as info:
        run_local(_internal_error_in_a_send, 2, timeout_s=30)
    assert info.value.rank == 0  # the cause, not rank 1's PeerLostError that follows it
    last = str(info.value).strip().splitlines()[-1]
    assert last == "RuntimeError: packing stage 0's output failed (an internal error)", last
    assert "PeerLostError" not in str(info.value) and "died or hung" not in str(info.value)


def _short_iterator():
    engine = _engine(config("1f1b", 2, 1, 4))
    engine.train_batch(iter(gpt_batches(3)))


def test_short_data_iterator_is_a_clear_error():
    with pytest.raises(WorkerError, match=r"data_iter ran out after 3 of 4 micro-batches"):
        run_local(_short_iterator, 2, timeout_s=30)


def _traced():
    engine = _engine(config("1f1b", 2, 1, 4, trace={"enabled": True},
                            lr_scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1,
                                          "gamma": 0.5}))
    engine.train_batch(iter(gpt_batches(4)))
    first = engine.last_timeline()
    engine.train_batch(iter(gpt_batches(4)))
    grouped = [label for _, label, _, _ in engine.last_timeline() if "+" in label]
    return first, engine.optimizer.param_groups[0]["lr"], grouped


def test_trace_records_every_instruction_and_lr_scheduler_steps():
    results = run_local(_traced, 2, timeout_s=60)
    schedule = build("1f1b", 2, 4)  # the groups the executor posts are the schedule's own
    for rank, (timeline, lr, grouped) in enumerate(results):
        assert lr == pytest.approx(0.125)  # two StepLR steps of 0.5 from 0.5
        assert grouped == [str(op) for op in schedule.streams[rank] if isinstance(op, Exchange)]
        # early receives (schedules/fusion.py) join each rank's transfers into two groups at 2 stages x 4
        assert len(grouped) == 2 and [label for _, label, _, _ in timeline] == list(map(str, schedule.streams[rank]))
        labels = [label for _, label, _, _ in timeline]
        assert all(r == rank for r, _, _, _ in timeline)
        assert labels[-1] == "STEP" and sum(lb.startswith(f"{rank}F") for lb in labels) == 4
        assert all(end >= start for _, _, start, end in timeline)


def _write_trace(path):
    engine = _engine(config("1f1b", 2, 2, 4, trace={"enabled": True}))
    engine.train_batch(iter(gpt_batches(4)))
    return engine.write_trace(path)


def test_write_trace_merges_every_rank(tmp_path):
    import json

    path = tmp_path / "trace.json"
    results = run_local(_write_trace, 4, (str(path),), timeout_s=60)
    assert results[1:] == [None, None, None]
    bubbles = results[0]
    assert 0.0 <= bubbles["measured_bubble"] < 1.0 and 0.0 <= bubbles["simulated_bubble"] < 1.0
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e.get("pid") for e in events if e.get("ph") == "X"}
    assert len(pids) == 4  # every rank has a row
    assert (tmp_path / "trace.png").exists()


def _nonfinite(policy):
    engine = _engine(config("1f1b", 2, 1, 2, train={"grad_clip": 0.0, "on_nonfinite": policy}))
    engine.train_batch(iter(gpt_batches(2)))
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    handle = None
    if dist.get_rank() == 1:  # the last stage's output turns NaN for one step
        handle = engine.module.stage_module(1).register_forward_hook(lambda m, i, out: out * float("nan"))
    loss = engine.train_batch(iter(gpt_batches(2)))
    handle and handle.remove()
    unchanged = all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    after = engine.train_batch(iter(gpt_batches(2)))
    return loss, unchanged, engine.skipped_steps, after


def test_nonfinite_loss_skips_the_step_everywhere_with_skip():
    for loss, unchanged, skipped, after in run_local(_nonfinite, 2, ("skip",), timeout_s=60):
        assert loss != loss and unchanged and skipped == 1 and after == after  # NaN, then training goes on


def test_nonfinite_loss_raises_naming_step_and_rank():
    with pytest.raises(WorkerError, match=r"rank \d: non-finite loss at step 1; .*train.on_nonfinite=skip"):
        run_local(_nonfinite, 2, ("raise",), timeout_s=60)


def _dropped_engine():
    import gc
    import os
    import weakref

    gc.disable()  # only reference counting may free the engine
    engine = _engine(config("1f1b", 2, 1, 2))
    engine.train_batch(iter(gpt_batches(2)))
    engine.eval_batch(iter(gpt_batches(2)))
    gone = weakref.ref(engine)
    del engine
    dist.destroy_process_group()
    return gone() is None, len(os.listdir("/proc/self/task"))


def test_a_dropped_engine_frees_its_process_groups_at_once():
    # An engine kept alive by a reference cycle keeps gloo's threads past
    # destroy_process_group, into interpreter shutdown, where they can abort the process.
    for freed, threads in run_local(_dropped_engine, 2, timeout_s=60):
        assert freed and threads == 1
