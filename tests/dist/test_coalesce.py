"""schedule.coalesce: groups of micro-batches cross stages as one message, with the same results."""

import pytest
import torch
import torch.distributed as dist

import pipegrid as pg
from pipegrid.launch import run_local
from tests.support.engine_cases import N_LAYER, assert_matches_reference, config, run_pipeline, run_reference
from tests.support.models import TinyGPT, gpt_batches

# (schedule, pipe, data, micro_batches, coalesce)
CASES = [
    ("gpipe", 2, 1, 8, 4), ("1f1b", 2, 1, 8, 2), ("1f1b", 2, 1, 8, 4), ("1f1b", 2, 1, 4, 4),
    ("zb_h1", 2, 1, 8, 2), ("interleaved_1f1b", 2, 1, 8, 2),
    ("1f1b", 3, 1, 6, 3), ("zb_h1", 3, 1, 6, 2), ("gpipe", 3, 1, 6, 2),
    ("1f1b", 2, 2, 6, 3), ("zb_h1", 2, 2, 4, 2),
]


def _run_all(configs):
    return [run_pipeline(cfg) for cfg in configs]


@pytest.mark.parametrize("world", sorted({p * d for _, p, d, _, _ in CASES}))
def test_coalesced_schedules_match_one_process(world):
    configs = [config(s, p, d, m, coalesce=k) for s, p, d, m, k in CASES if p * d == world]
    per_rank = run_local(_run_all, world, (configs,), timeout_s=120)
    for i, cfg in enumerate(configs):
        assert_matches_reference([rank_results[i] for rank_results in per_rank], run_reference(cfg),
                                 rtol=1e-5, atol=1e-6)


def _engine(cfg):
    topo = pg.Topology(**cfg["topology"])
    return pg.initialize(TinyGPT(N_LAYER, topology=topo, virtual_stages=cfg["schedule"]["virtual_stages"]), cfg)


def _eval_and_train(coalesce):
    engine = _engine(config("1f1b", 2, 1, 4, coalesce=coalesce))
    batches = gpt_batches(4)
    loss, outputs = engine.eval_batch(iter(batches), return_outputs=True)
    train = engine.train_batch(iter(batches))
    return loss, outputs, train, engine.eval_batch(iter(batches))


def test_eval_batch_with_groups_returns_what_single_messages_do():
    plain = run_local(_eval_and_train, 2, (1,), timeout_s=60)
    grouped = run_local(_eval_and_train, 2, (2,), timeout_s=60)
    for rank in range(2):
        loss, outputs, train, again = grouped[rank]
        assert (loss, train, again) == pytest.approx(plain[rank][::2] + (plain[rank][3],), rel=1e-6)
    assert grouped[0][1] is None and len(grouped[1][1]) == 4
    for got, want in zip(grouped[1][1], plain[1][1]):
        torch.testing.assert_close(got, want)


def _loss_collectives(data):
    engine = _engine(config("1f1b", 2, data, 4, grad_clip=0.0, coalesce=2))
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, group=None, **kwargs):  # the loss and its flags: the float64 all-reduces
        if tensor.dtype == torch.float64:
            calls.append("world" if group is None or group is dist.group.WORLD else "data")
        return all_reduce(tensor, *args, group=group, **kwargs)
    dist.all_reduce = counted
    try:
        loss = engine.train_batch(iter(gpt_batches(4, seed=engine.groups.coord.data)))
    finally:
        dist.all_reduce = all_reduce
    return loss, calls


def test_step_loss_rides_on_gradient_messages_not_a_world_all_reduce():
    losses, calls = zip(*run_local(_loss_collectives, 2, (1,), timeout_s=60))
    assert losses[0] == losses[1] and calls == ([], [])  # data=1: the loss needs no collective at all
    losses, calls = zip(*run_local(_loss_collectives, 4, (2,), timeout_s=60))
    assert all(ranks_calls == ["data"] for ranks_calls in calls)  # one all-reduce over the data axis
    alone = run_local(_loss_collectives, 2, (1,), timeout_s=60)[0][0]  # replica 0's data only
    assert len(set(losses)) == 1 and losses[0] != alone  # averaged with replica 1's, on every rank


def _dynamic(coalesce):
    engine = _engine(config("1f1b", 2, 1, 4, coalesce=coalesce, comm={"dynamic_shapes": True, "timeout_s": 30}))
    losses = []
    for step, seq_len in enumerate((6, 4, 5)):  # a new length every step, and within a group
        batches = [gpt_batches(1, seq_len=seq_len - k % 2, seed=10 * step + k)[0] for k in range(4)]
        losses.append(engine.train_batch(iter(batches)))
    return losses


def test_groups_with_changing_shapes_renegotiate_and_match_single_messages():
    single = run_local(_dynamic, 2, (1,), timeout_s=60)
    grouped = run_local(_dynamic, 2, (2,), timeout_s=60)
    assert grouped[0] == grouped[1]
    assert grouped[0] == pytest.approx(single[0], rel=1e-6)
