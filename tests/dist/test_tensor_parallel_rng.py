"""The tensor-parallel dropout stream (pipegrid/tensor/random.py) on gloo at tensor=2, dropout > 0.

- Which stream each dropout draws from, seen by a TorchFunctionMode that records the default
  generator's state at every dropout: core attention (the example GPT's sdpa, transformers GPT-2's
  eager attention weights) draws a different state on each tensor rank, the replicated hidden
  state's dropouts the same one, and the hidden state after every block stays bitwise identical
  across tensor ranks. Under sequence parallelism every dropout inside a block draws its own (its
  chunk's masks differ), the embedding's dropout before the scatter a shared one.
- Activation checkpointing redraws the same masks: on equals off (losses and every parameter), with
  and without sequence parallelism, under zb_h1's split backward, and for sequence-parallel GPT-2;
  compiled stages (aot_eager) equal eager.
- A checkpoint saves the stream: save at step 2 and resume equals the uninterrupted run; a rank
  state from before (no stream in it) still loads.
Dropout 0 and tensor 1 are untouched: the other tests' references hold as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import pipegrid as pg
from examples.models.gpt import GPT, Block
from pipegrid import hf
from pipegrid.launch import run_local
from pipegrid.pipe.checkpoint.files import set_rng_state
from pipegrid.tensor import TensorParallelRNG, rng_trackers
from tests.support.engine_cases import config, global_batches
from tests.support.hf_models import ATTN, lm_batches, tiny_config
from tests.support.tensor_gpt import GPT_CFG, sharded_state

DROPOUT = 0.5  # high, so a mask shared by mistake is as unlikely by chance as it gets
TP_CFG = dataclasses.replace(GPT_CFG, dropout=DROPOUT)
SP_CFG = dataclasses.replace(TP_CFG, sequence_parallel=True)
GRID = {"topology": {"tensor": 2}}
STEPS = 3


def _digest(state: torch.Tensor) -> str:
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()


class _Draws(TorchFunctionMode):
    """Records (kind, shape, default generator state, mask) at each dropout that draws."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, str, torch.Tensor | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = _digest(torch.get_rng_state()) if func in (F.dropout, F.scaled_dot_product_attention) else ""
        out = func(*args, **kwargs)
        if func is F.dropout and kwargs.get("training", args[2] if len(args) > 2 else True) and \
                kwargs.get("p", args[1] if len(args) > 1 else 0.5) > 0:
            self.calls.append(("dropout", tuple(args[0].shape), state, (out == 0).detach()))
        elif func is F.scaled_dot_product_attention and kwargs.get("dropout_p", 0.0) > 0:
            self.calls.append(("sdpa", tuple(args[0].shape), state, None))
        return out


def _gpt_forward(cfg) -> dict:
    """One training-mode forward of the example GPT at tensor 2: its draws and each block's output."""
    groups = pg.init_distributed(GRID)
    torch.manual_seed(3)  # the default generator: the same on both tensor ranks
    model = GPT(cfg, topology=groups.topology, tensor_group=groups.tensor_parallel_group).train()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return _observe(model, blocks, global_batches(0, 1, 1)[0][0])


def _hf_forward(sequence_parallel: bool) -> dict:
    """The same for transformers GPT-2 (eager attention, attention/residual/embedding dropout)."""
    groups = pg.init_distributed(GRID)
    torch.manual_seed(3)
    config = tiny_config("gpt2", resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = hf.from_config(config, topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                           attn_implementation=ATTN, sequence_parallel=sequence_parallel).train()
    layers = [m for m in model.modules() if type(m).__name__ == "DecoderLayer"]
    return _observe(model, layers, lm_batches(1, seed=5)[0][0])


def _observe(model: torch.nn.Module, blocks: list, ids: torch.Tensor) -> dict:
    outputs: list[torch.Tensor] = []
    for block in blocks:
        block.register_forward_hook(lambda _m, _i, out: outputs.append(
            (out[0] if isinstance(out, tuple) else out).detach().clone()))
    draws = _Draws()
    with draws:
        model(ids)
    tracker = model.tensor_parallel_rng if hasattr(model, "tensor_parallel_rng") else model.skeleton.tensor_rng
    with tracker.fork():
        forked = torch.rand(64)
    return {"calls": draws.calls, "outputs": outputs, "default_after": _digest(torch.get_rng_state()),
            "forked": forked, "shared": torch.rand(64)}


def _forward_results() -> dict:
    return {"gpt": _gpt_forward(TP_CFG), "gpt_sp": _gpt_forward(SP_CFG),
            "hf": _hf_forward(False), "hf_sp": _hf_forward(True)}


@pytest.fixture(scope="module")
def forward() -> list[dict]:
    return run_local(_forward_results, 2, timeout_s=120)


def _pairs(forward: list[dict], name: str) -> list[tuple]:
    """(rank 0's call, rank 1's call) of each dropout, in order."""
    zero, one = forward[0][name]["calls"], forward[1][name]["calls"]
    assert len(zero) == len(one) and zero, (name, len(zero), len(one))
    return list(zip(zero, one))


def test_the_streams_differ_across_tensor_ranks_and_the_default_one_does_not(forward):
    for name in ("gpt", "gpt_sp", "hf", "hf_sp"):
        zero, one = forward[0][name], forward[1][name]
        assert not torch.equal(zero["forked"], one["forked"]), name  # a different stream per tensor rank
        assert torch.equal(zero["shared"], one["shared"]), name
        assert zero["default_after"] == one["default_after"], name  # both drew the same from the default


@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_attention_masks_differ_per_rank_while_the_hidden_state_stays_identical(forward, name):
    kinds = {"gpt": "sdpa", "hf": "dropout"}  # GPT-2 eager: dropout on the (B, h, T, T) attention weights
    core = [(a, b) for a, b in _pairs(forward, name) if a[0] == kinds[name] and len(a[1]) == 4]
    replicated = [(a, b) for a, b in _pairs(forward, name) if len(a[1]) == 3]
    assert len(core) == 2 and replicated, [c[:2] for c, _ in _pairs(forward, name)]  # one per block
    for a, b in core:
        assert a[2] != b[2], f"{name}: core attention drew the same state on both tensor ranks"
    for a, b in replicated:  # embedding, residual and MLP dropout on the replicated hidden state
        assert a[2] == b[2] and torch.equal(a[3], b[3]), f"{name}: a replicated dropout differs across ranks"
    for i, (a, b) in enumerate(zip(forward[0][name]["outputs"], forward[1][name]["outputs"])):
        assert torch.equal(a, b), f"{name}: the hidden state after block {i} differs across tensor ranks"


@pytest.mark.parametrize("name", ["gpt_sp", "hf_sp"])
def test_sequence_parallel_chunks_draw_their_own_masks(forward, name):
    pairs = _pairs(forward, name)
    # the embedding's dropout runs on the whole sequence before the scatter: shared, then chunked
    # (pipegrid.hf also runs it once more, to capture the decoder layers' other arguments)
    whole = [(a, b) for a, b in pairs if len(a[1]) == 3 and a[1][1] == GPT_CFG.seq_len]
    chunks = [(a, b) for a, b in pairs if len(a[1]) == 3 and a[1][1] == GPT_CFG.seq_len // 2]
    assert whole and len(chunks) == 4, [a[:2] for a, _ in pairs]  # residual + MLP per block
    assert all(a[2] == b[2] for a, b in whole)
    for a, b in chunks:
        assert a[2] != b[2] and not torch.equal(a[3], b[3]), f"{name}: two chunks drew the same mask"
    for a, b in pairs:
        if len(a[1]) == 4 or a[0] == "sdpa":
            assert a[2] != b[2], f"{name}: core attention drew the same state on both ranks"


# ---- training: activation checkpointing and resuming ----------------------------------------

def _train(cfg: dict, gpt_cfg, steps: int, recompute: int = 0, engine_then=None) -> dict:
    groups = pg.init_distributed(cfg)
    torch.manual_seed(11)
    model = GPT(gpt_cfg, topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                activation_checkpoint_interval=recompute)
    engine = pg.initialize(model, cfg, groups=groups)
    losses = [engine.train_batch(iter(global_batches(s, 1, cfg["schedule"]["micro_batches"]))) for s in range(steps)]
    if engine_then is not None:
        engine_then(engine)
    return {"losses": losses, "state": sharded_state(engine.module)}


def _train_hf(recompute: int) -> dict:
    """transformers GPT-2, sequence-parallel (every dropout in a decoder layer on the stream)."""
    cfg = _train_config()
    groups = pg.init_distributed(cfg)
    torch.manual_seed(11)
    config = tiny_config("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = hf.from_config(config, topology=groups.topology, tensor_group=groups.tensor_parallel_group,
                           attn_implementation=ATTN, sequence_parallel=True, activation_checkpoint_interval=recompute)
    engine = pg.initialize(model, cfg, groups=groups)
    losses = [engine.train_batch(iter(lm_batches(2, seed=20 + s))) for s in range(2)]
    return {"losses": losses, "state": {name: (p.detach().clone(), getattr(p, "partition_dim", None))
                                        for name, p in engine.module.named_parameters()}}


def _train_config(schedule: str = "1f1b", **extra) -> dict:
    cfg = config(schedule, 1, 1, 2, grad_clip=0.05, **extra)
    cfg["topology"]["tensor"] = 2
    return cfg


# aot_eager runs the graph's dropout on the default generator where eager would: compiled equals eager
COMPILED = {"compile": {"enabled": True, "backend": "aot_eager"}}
TRAIN_CASES = {  # name: (schedule, model config, activation_checkpoint_interval, extra config)
    "plain": ("1f1b", TP_CFG, 0, {}), "plain-recompute": ("1f1b", TP_CFG, 1, {}),
    "sp": ("1f1b", SP_CFG, 0, {}), "sp-recompute": ("1f1b", SP_CFG, 1, {}),
    "sp-recompute-zb_h1": ("zb_h1", SP_CFG, 1, {}), "sp-compiled": ("1f1b", SP_CFG, 0, COMPILED),
}


def _resume(directory: str) -> dict:
    cfg = _train_config()
    whole = _train(cfg, SP_CFG, 4)
    _train(cfg, SP_CFG, 2, engine_then=lambda engine: engine.save_checkpoint(directory))
    groups = pg.init_distributed(cfg)
    torch.manual_seed(99)  # whatever the process drew since: the checkpoint puts every stream back
    model = GPT(SP_CFG, topology=groups.topology, tensor_group=groups.tensor_parallel_group)
    engine = pg.initialize(model, cfg, groups=groups)
    assert engine.load_checkpoint(directory) == 2
    losses = [engine.train_batch(iter(global_batches(s, 1, 2))) for s in (2, 3)]
    stream = rng_trackers(engine.module)[0].state_dict()["cpu"]
    set_rng_state({"torch": torch.get_rng_state()}, engine.module)  # a rank state written before the stream
    unchanged = torch.equal(rng_trackers(engine.module)[0].state_dict()["cpu"], stream)
    return {"whole": whole, "resumed": {"losses": losses, "state": sharded_state(engine.module)},
            "old_state_loads": unchanged}


def _training_results(directory: str) -> dict:
    runs = {name: _train(_train_config(schedule, **extra), gpt_cfg, STEPS, recompute)
            for name, (schedule, gpt_cfg, recompute, extra) in TRAIN_CASES.items()}
    runs.update({"hf-sp": _train_hf(0), "hf-sp-recompute": _train_hf(1)})
    return {"runs": runs, "resume": _resume(directory)}


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> list[dict]:
    return run_local(_training_results, 2, (str(tmp_path_factory.mktemp("tp-rng-ckpt")),), timeout_s=180)


def _assert_same(name: str, got: dict, want: dict, exact: bool = True) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), **tol,
                               msg=lambda m: f"{name} losses: {m}")
    for key, (value, _) in want["state"].items():
        torch.testing.assert_close(got["state"][key][0], value, **tol, msg=lambda m, key=key: f"{name} {key}: {m}")


@pytest.mark.parametrize("case,against,exact", [("plain-recompute", "plain", True), ("sp-recompute", "sp", True),
                                                ("sp-recompute-zb_h1", "sp", False),
                                                ("hf-sp-recompute", "hf-sp", True), ("sp-compiled", "sp", True)])
def test_recompute_and_compiled_stages_draw_the_masks_eager_draws(training, case, against, exact):
    for rank, result in enumerate(training):
        runs = result["runs"]
        _assert_same(f"rank {rank} {case} vs {against}", runs[case], runs[against], exact)


def test_tensor_ranks_keep_the_replicated_parameters_identical(training):
    for name in [*TRAIN_CASES, "hf-sp"]:
        zero, one = training[0]["runs"][name], training[1]["runs"][name]
        assert zero["losses"] == one["losses"], name
        for key, (value, dim) in zero["state"].items():
            if dim is None:
                assert torch.equal(value, one["state"][key][0]), f"{name}: {key} differs across tensor ranks"


def test_resuming_continues_every_stream(training):
    for rank, result in enumerate(training):
        whole, resumed = result["resume"]["whole"], result["resume"]["resumed"]
        _assert_same(f"rank {rank} resumed", resumed, {"losses": whole["losses"][2:], "state": whole["state"]})
        assert result["resume"]["old_state_loads"]


def test_tensor_1_has_no_active_stream():
    model = GPT(TP_CFG, topology=pg.Topology())
    assert rng_trackers(model) == [] and not model.tensor_parallel_rng.active
    before = torch.get_rng_state()
    with TensorParallelRNG().fork():  # inactive: draws from the default generator as if not there
        drawn = torch.rand(3)
    torch.set_rng_state(before)
    assert torch.equal(drawn, torch.rand(3))
