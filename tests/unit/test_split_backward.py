"""backward_input + backward_weight equal one plain backward (float64) on the stage shapes
zb_h1 meets, with several micro-batches in flight, and do the same matmuls (the time they
cost: benchmarks/split_backward.py)."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipegrid.pipe.split_backward import backward_input, backward_weight

H = 8  # hidden size of the small stages


def mlp(layers: int = 3, hidden: int = H) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU())
                           for _ in range(layers)])


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.body = nn.LayerNorm(H), mlp(2)

    def forward(self, x):
        return x + self.body(self.norm(x))


class Tied(nn.Module):
    """The same Linear twice, with an untied Linear before and after it."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.shared, self.last = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x):
        return self.last(self.shared(torch.tanh(self.shared(self.first(x)))))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.first, self.block, self.last = nn.Linear(H, H), mlp(2), nn.Linear(H, H)

    def forward(self, x):
        h = checkpoint(self.block, self.first(x), use_reentrant=self.reentrant)
        return self.last(h)


class Embed(nn.Module):
    """First stage: integer token ids in, nothing to send back."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body = nn.Embedding(11, H), mlp(2)

    def forward(self, ids):
        return self.body(self.embed(ids))


class TwoOutputs(nn.Module):
    """Activations plus a tensor that does not require grad (a mask sent along)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused = mlp(2), nn.Linear(H, H)

    def forward(self, x):
        return self.body(x), (x > 0).to(torch.int64)


class ParamOutputs(nn.Module):
    """Outputs that depend on parameters only, one of them a parameter the input path uses too."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.offset = nn.Linear(H, H), nn.Parameter(torch.randn(H))

    def forward(self, x):
        return self.lin(x), self.lin.bias.expand(4, H) * 2, self.offset.expand(4, H) * 3


def make_input(name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "embed":
        return torch.randint(0, 11, (4, 5), generator=g)
    return torch.randn(4, H, dtype=torch.float64, generator=g).requires_grad_()


STAGES = {
    "mlp": mlp, "residual": Residual, "tied": Tied, "embed": Embed, "two_outputs": TwoOutputs,
    "param_outputs": ParamOutputs,
    "checkpoint": lambda: Checkpointed(reentrant=False),
    "checkpoint_reentrant": lambda: Checkpointed(reentrant=True),
}


def run_forward(stage: nn.Module, x: torch.Tensor, seed: int, loss: bool):
    """(outputs, grad_outputs) as an executor has them at backward time."""
    out = stage(x)
    outputs = list(out) if isinstance(out, tuple) else [out]
    if loss:
        return [outputs[0].square().mean()], [None]
    g = torch.Generator().manual_seed(seed + 100)
    grads = [torch.randn(o.shape, dtype=o.dtype, generator=g) if o.requires_grad else None for o in outputs]
    return outputs, grads


def twins(name: str):
    torch.manual_seed(0)
    reference = STAGES[name]().double()
    split = STAGES[name]().double()
    split.load_state_dict(reference.state_dict())
    return reference, split


def reference_backward(stage, name, seeds, loss):
    input_grads = []
    for seed in seeds:
        x = make_input(name, seed)
        outputs, grads = run_forward(stage, x, seed, loss)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads.append(x.grad)
    return input_grads


def assert_same(reference, split, ref_input_grads, split_input_grads):
    for a, b in zip(ref_input_grads, split_input_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(reference.named_parameters(), split.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss", [False, True], ids=["activations", "loss"])
@pytest.mark.parametrize("name", list(STAGES))
def test_one_micro_batch_equals_plain_backward(name, loss):
    reference, split = twins(name)
    ref_grads = reference_backward(reference, name, [0], loss)
    x = make_input(name, 0)
    outputs, grads = run_forward(split, x, 0, loss)
    input_grads, state = backward_input(outputs, grads, [x], list(split.parameters()))
    assert all(p.grad is None for p in state.deferred_params), "I must leave deferred parameters alone"
    backward_weight(state)
    assert_same(reference, split, ref_grads, input_grads)
    if name in ("mlp", "residual", "embed", "two_outputs"):
        assert not state.early_reasons and not state.early_params


def test_fallbacks_are_named():
    _, tied = twins("tied")
    x = make_input("tied", 0)
    outputs, grads = run_forward(tied, x, 0, loss=False)
    _, state = backward_input(outputs, grads, [x], list(tied.parameters()))
    assert {id(p) for p in state.early_params} == {id(tied.shared.weight), id(tied.shared.bias)}
    assert "tied or shared" in " ".join(state.early_reasons)
    backward_weight(state)

    _, stage = twins("param_outputs")
    x = make_input("param_outputs", 0)
    outputs, grads = run_forward(stage, x, 0, loss=False)
    _, state = backward_input(outputs, grads, [x], list(stage.parameters()))
    assert [id(p) for p in state.early_params] == [id(stage.lin.bias)]
    assert {id(p) for p in state.deferred_params} == {id(stage.lin.weight), id(stage.offset)}

    _, ckpt = twins("checkpoint")
    x = make_input("checkpoint", 0)
    outputs, grads = run_forward(ckpt, x, 0, loss=False)
    _, state = backward_input(outputs, grads, [x], list(ckpt.parameters()))
    assert {id(p) for p in state.early_params} == {id(p) for p in ckpt.block.parameters()}
    assert {id(p) for p in state.deferred_params} == {id(p) for m in (ckpt.first, ckpt.last)
                                                     for p in m.parameters()}
    assert "checkpointing" in " ".join(state.early_reasons)


@pytest.mark.parametrize("order", ["IIIWWW", "IWIWIW", "IIWIWW-reversed"])
@pytest.mark.parametrize("name", ["mlp", "tied", "checkpoint", "embed"])
def test_micro_batches_in_flight(name, order):
    reference, split = twins(name)
    seeds = [0, 1, 2]
    with torch.no_grad():  # gradients add up onto what is already there, as .backward() does
        for stage in (reference, split):
            for p in stage.parameters():
                p.grad = torch.ones_like(p)
    ref_grads = reference_backward(reference, name, seeds, loss=False)
    states, input_grads, pending = {}, {}, list(seeds)
    w_order = seeds[::-1] if order.endswith("reversed") else list(seeds)
    for step in order.split("-")[0]:
        if step == "I":
            seed = pending.pop(0)
            x = make_input(name, seed)
            outputs, grads = run_forward(split, x, seed, loss=False)
            input_grads[seed], states[seed] = backward_input(outputs, grads, [x], list(split.parameters()))
        else:
            ready = [s for s in w_order if s in states]
            backward_weight(states.pop(ready[0]))
    assert_same(reference, split, ref_grads, [input_grads[s][0] for s in seeds])


def test_unused_input_and_parameter():
    torch.manual_seed(0)
    stage, spare = nn.Linear(H, H).double(), nn.Linear(H, H).double()
    x, unused = make_input("mlp", 0), make_input("mlp", 1)
    out = stage(x)
    grads, state = backward_input([out], [torch.ones_like(out)], [x, unused],
                                  [*stage.parameters(), *spare.parameters()])
    backward_weight(state)
    assert grads[0] is not None and grads[1] is None
    assert all(p.grad is None for p in spare.parameters())
    assert all(p.grad is not None for p in stage.parameters())


def test_only_branch_points_run_twice():
    """No double traversal: in I + W every node runs once, except the branch points (I
    does their input half, W their parameter half)."""
    torch.manual_seed(0)
    stage = mlp(4).double()
    x = make_input("mlp", 0)
    out = stage(x)
    runs, nodes, queue = {}, set(), [out.grad_fn]
    while queue:
        node = queue.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            node.register_prehook(lambda grads, node=node: runs.__setitem__(node, runs.get(node, 0) + 1))
            queue += [kid for kid, _ in node.next_functions]
    _, state = backward_input([out], [torch.ones_like(out)], [x], list(stage.parameters()))
    backward_weight(state)
    twice = sorted(type(n).__name__ for n, count in runs.items() if count == 2)
    assert max(runs.values()) == 2
    assert twice == ["AddmmBackward0"] * 4 + ["NativeLayerNormBackward0"] * 4


def test_weight_releases_the_graph():
    """Between I and W the activations W needs stay alive; after W nothing holds them."""
    torch.manual_seed(0)
    stage = mlp(2).double()
    kept = []
    stage[0][0].register_forward_hook(lambda module, args, out: kept.append(weakref.ref(out)))
    x = make_input("mlp", 0)
    out = stage(x)
    _, state = backward_input([out], [torch.ones_like(out)], [x], list(stage.parameters()))
    del out
    gc.collect()
    assert kept[0]() is not None, "W still needs the first layer's output (the next LayerNorm saved it)"
    backward_weight(state)
    gc.collect()
    assert kept[0]() is None


def test_misuse_is_refused():
    stage = nn.Linear(H, H).double()
    x = make_input("mlp", 0)
    out = stage(x)
    with pytest.raises(ValueError, match="one gradient per output"):
        backward_input([out], [], [x], list(stage.parameters()))
    with pytest.raises(ValueError, match="only allowed for a scalar"):
        backward_input([out], [None], [x], list(stage.parameters()))
    with pytest.raises(ValueError, match="not a leaf"):
        backward_input([out], [torch.ones_like(out)], [x * 2], list(stage.parameters()))
    _, state = backward_input([out], [torch.ones_like(out)], [x], list(stage.parameters()))
    backward_weight(state)
    with pytest.raises(RuntimeError, match="already ran"):
        backward_weight(state)


@pytest.mark.parametrize("hidden", [H, 64])
def test_input_and_weight_halves_split_the_backward_s_matmuls(hidden):
    """I and W together do exactly the matmul FLOPs of one plain backward, half each on a
    Linear stack (dX and dW): the split adds autograd calls, not work. What the calls
    cost in time: benchmarks/split_backward.py."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    stage = mlp(4, hidden=hidden)
    params = list(stage.parameters())

    def flops(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    x = torch.randn(16, hidden, requires_grad=True)
    out = stage(x)
    full = flops(lambda: out.backward(torch.ones_like(out)))
    x = torch.randn(16, hidden, requires_grad=True)
    out = stage(x)
    state = []
    first = flops(lambda: state.append(backward_input([out], [torch.ones_like(out)], [x], params)[1]))
    second = flops(lambda: backward_weight(state[0]))
    assert full == 2 * 2 * 16 * hidden * hidden * 4  # dX and dW of 4 Linear layers
    assert first == second == full // 2
