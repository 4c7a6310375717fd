"""PipelineModule: stages put together equal the reference, a stage builds only its own
layers, tied weights resolve and start equal, checkpointing keeps gradients."""

import pytest
import torch
from torch import nn

from pipegrid.pipe.module import PipelineModule, build_reference
from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec
from pipegrid.topology.grid import Topology
from tests.support.models import Block, Embed, cross_entropy, gpt_batches, gpt_layers, mlp_layers

METHODS = ["parameters", "uniform", "type:Block", [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0]]
LAYOUTS = [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (3, 3)]


def all_stages(layers, p, v, method="parameters", **kwargs):
    return [PipelineModule(layers, pipe=p, pipe_rank=r, virtual_stages=v,
                           partition_method=method, **kwargs) for r in range(p)]


def union_by_index(stages):
    """global layer index -> module, from every model stage of every pipe rank."""
    found = {}
    for module in stages:
        for s in module.stage_ids:
            for i, layer in module.local_layers(s):
                assert i not in found, f"layer {i} held twice"
                found[i] = layer
    return found


def assert_same_module(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("p,v", LAYOUTS)
@pytest.mark.parametrize("method", METHODS, ids=["parameters", "uniform", "type", "costs"])
def test_stages_together_equal_the_reference(p, v, method):
    layers = gpt_layers(n_layer=4)  # 9 layers
    reference = dict(build_reference(layers).local_layers())
    stages = all_stages(layers, p, v, method)
    assert len({tuple(m.parts) for m in stages}) == 1
    union = union_by_index(stages)
    assert sorted(union) == list(range(9))
    for i, layer in union.items():
        if isinstance(layer, nn.Module):
            assert_same_module(layer, reference[i])
        else:
            assert layer is reference[i]


@pytest.mark.parametrize("p,v", [(2, 1), (3, 1), (2, 2)])
def test_mlp_stages_equal_the_reference(p, v):
    layers = mlp_layers(depth=6)
    reference = dict(build_reference(layers).local_layers())
    for i, layer in union_by_index(all_stages(layers, p, v)).items():
        assert_same_module(layer, reference[i])


def _hop(x):
    """What a point-to-point hop does: a detached copy that collects the gradient."""
    if isinstance(x, tuple):
        return tuple(_hop(t) for t in x)
    return x.detach().requires_grad_(x.is_floating_point())


def _grads_of(x):
    xs = x if isinstance(x, tuple) else (x,)
    return tuple(t.grad if t.is_floating_point() else None for t in xs)


def _pipeline_step(stages, ids, labels):
    """Forward stage by stage, then backward last stage first; returns the loss."""
    inputs, outputs, x = [], [], ids
    for module in stages:
        inputs.append(x)
        outputs.append(module(x))
        x = _hop(outputs[-1])
    loss = stages[-1].loss_fn(outputs[-1], labels)
    loss.backward()
    for r in reversed(range(len(stages) - 1)):
        outs = outputs[r] if isinstance(outputs[r], tuple) else (outputs[r],)
        pairs = [(o, g) for o, g in zip(outs, _grads_of(inputs[r + 1])) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss


@pytest.mark.parametrize("p", [2, 3, 4])
def test_chained_stages_match_reference_loss_and_gradients(p):
    layers = gpt_layers(n_layer=4)
    reference = build_reference(layers, loss_fn=cross_entropy)
    ids, labels = gpt_batches(1)[0]
    ref_loss = reference.loss_fn(reference(ids), labels)
    ref_loss.backward()
    stages = all_stages(layers, p, 1, loss_fn=cross_entropy)
    assert torch.equal(_pipeline_step(stages, ids, labels), ref_loss)
    ref_layers = dict(reference.local_layers())
    for module in stages:
        for i, layer in module.local_layers():
            if isinstance(layer, nn.Module) and not isinstance(layer, Embed):
                for a, b in zip(layer.parameters(), ref_layers[i].parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    # the engine sums tied gradients over the owners; that sum is the reference's
    tied = sum(m.tied_parameters("embed")[0].grad for m in stages if m.tied_modules)
    torch.testing.assert_close(tied, reference.tied_parameters("embed")[0].grad,
                               rtol=1e-5, atol=1e-6)


class Counted(nn.Module):
    built: list = []

    def __init__(self, tag, width=4):
        super().__init__()
        self.fc = nn.Linear(width, width)
        if self.fc.weight.device.type != "meta":  # meta builds only count parameters
            Counted.built.append(tag)


@pytest.mark.parametrize("method", ["parameters", "uniform", "type:Counted"])
@pytest.mark.parametrize("p,v", [(2, 1), (3, 1), (2, 2)])
def test_a_stage_builds_only_its_layers(method, p, v):
    layers = [LayerSpec(Counted, i) for i in range(8)]
    for r in range(p):
        Counted.built = []
        module = PipelineModule(layers, pipe=p, pipe_rank=r, virtual_stages=v,
                                partition_method=method)
        mine = [i for s in module.stage_ids for i in range(module.parts[s], module.parts[s + 1])]
        assert sorted(Counted.built) == mine
        Counted.built = []
        assert "stage" in module.describe() and Counted.built == []


def test_tied_keys_and_params_equal_across_owners():
    layers = gpt_layers(n_layer=4)
    stages = all_stages(layers, 3, 1)
    assert all(m.tied_keys() == {"embed": [0, 2]} for m in stages)
    assert stages[0].tied_pipe_ranks() == {"embed": [0, 2]}
    first, middle, last = (m.tied_parameters("embed") for m in stages)
    assert middle == [] and len(first) == len(last) == 1
    assert torch.equal(first[0], last[0])
    assert torch.equal(first[0], build_reference(layers).tied_parameters("embed")[0])
    with pytest.raises(ValueError, match="unknown tied key 'head'"):
        stages[0].tied_parameters("head")


def test_tied_module_seeded_from_first_use_on_a_later_stage():
    tied = TiedLayerSpec("w", nn.Linear, 4, 4, tied_weight_attr=["weight", "bias"])
    layers = [LayerSpec(nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4), tied,
              LayerSpec(nn.Linear, 4, 4), tied]
    ref = build_reference(layers)
    last = PipelineModule(layers, pipe=3, pipe_rank=2, partition_method="uniform")
    assert last.parts == [0, 2, 4, 5] and last.tied_keys() == {"w": [1, 2]}
    for a, b in zip(last.tied_parameters("w"), ref.tied_parameters("w")):
        assert torch.equal(a, b)


def test_one_tied_module_per_process_shared_by_chunks():
    model = PipelineModule(gpt_layers(n_layer=2), pipe=1, virtual_stages=2,
                           partition_method="uniform")
    assert model.stage_ids == [0, 1] and list(model.tied_modules) == ["embed"]
    first, last = model.local_layers(0)[0][1], model.local_layers(1)[-1][1]
    assert first is last is model.tied_modules["embed"]
    weight = model.tied_modules["embed"].tok.weight
    assert any(p is weight for p in model.stage_module(0).parameters())
    assert any(p is weight for p in model.stage_module(1).parameters())
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    assert sum(p.numel() for p in params) == sum(
        p.numel() for p in build_reference(gpt_layers(n_layer=2)).parameters())


def run_grads(model, x, stage=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout draws the same masks in every run
    out = model(x, stage)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("interval", [1, 2, 3, 100])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("kind", ["gpt", "mlp"])
def test_checkpointed_gradients_equal_plain(interval, input_grad, kind):
    if kind == "gpt":
        layers, x = gpt_layers(n_layer=3)[1:-1], torch.randn(2, 6, 8)  # tuple boundaries
    else:
        layers = [*mlp_layers(depth=3), LayerSpec(nn.Dropout, 0.3), lambda t: t * 2]
        x = torch.randn(3, 8)
    plain = build_reference(layers)
    ckpt = build_reference(layers, activation_checkpoint_interval=interval)
    x_plain, x_ckpt = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    out_a, grads_a = run_grads(plain, x_plain)
    out_b, grads_b = run_grads(ckpt, x_ckpt)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0)
    if input_grad:
        torch.testing.assert_close(x_ckpt.grad, x_plain.grad, rtol=0, atol=0)


def test_checkpoint_interval_is_settable_and_dtype_follows_to():
    model = build_reference(gpt_layers()).double()
    model.activation_checkpoint_interval = 2
    assert model.stage_module().activation_checkpoint_interval == 2
    ids, labels = gpt_batches(1)[0]
    logits = model(ids)
    assert logits.dtype == torch.float64
    cross_entropy(logits, labels).backward()
    assert model.tied_parameters("embed")[0].grad.dtype == torch.float64


def test_stage_helpers():
    model = PipelineModule(gpt_layers(n_layer=4), pipe=2, pipe_rank=1, virtual_stages=2,
                           partition_method="uniform")
    assert model.num_model_stages == 4 and model.stage_ids == [1, 3]
    assert model.parts == [0, 3, 5, 7, 9]
    assert [model.layer_owner(i) for i in range(9)] == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert [i for i, _ in model.local_layers(3)] == [7, 8]
    assert model.is_first_stage(0) and not model.is_first_stage(1)
    assert model.is_last_stage(3) and not model.is_last_stage(1)
    assert model.pipe_rank_of(2) == 0
    with pytest.raises(RuntimeError, match=r"holds model stages \[1, 3\].*pass stage="):
        model(torch.zeros(1))
    with pytest.raises(ValueError, match=r"model stage 2 is not held by pipe rank 1"):
        model.stage_module(2)
    rank0 = PipelineModule(gpt_layers(n_layer=4), pipe=2, pipe_rank=0, virtual_stages=2,
                           partition_method="uniform")
    ids = gpt_batches(1)[0][0]
    x = rank0(model(rank0(ids, stage=0), stage=1), stage=2)
    logits = model(x, stage=3)
    assert torch.equal(logits, build_reference(gpt_layers(n_layer=4))(ids))


def test_v_placement_holds_stages_r_and_2p_minus_1_minus_r():
    p, layers = 3, gpt_layers(n_layer=4)  # 9 layers over 6 model stages
    stages = [PipelineModule(layers, pipe=p, pipe_rank=r, virtual_stages=2, stage_placement="v",
                             partition_method="uniform") for r in range(p)]
    assert [m.stage_ids for m in stages] == [[0, 5], [1, 4], [2, 3]]
    assert [stages[0].pipe_rank_of(s) for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert sorted(union_by_index(stages)) == list(range(9))  # every layer once, wherever it lands
    assert "\n5*     0 " in stages[0].describe() and "\n3      2 " in stages[0].describe()
    ids = gpt_batches(1)[0][0]
    x = ids
    for s in range(6):  # run the chain through whichever rank holds each stage
        x = stages[stages[0].pipe_rank_of(s)](x, stage=s)
    assert torch.equal(x, build_reference(layers)(ids))


def test_tied_copies_on_one_rank_of_a_v_share_one_parameter():
    stages = [PipelineModule(gpt_layers(n_layer=4), pipe=2, pipe_rank=r, virtual_stages=2,
                             stage_placement="v", partition_method="uniform") for r in range(2)]
    first = stages[0]  # the embedding (stage 0) and the head (stage 3) both land on rank 0
    assert first.tied_keys() == {"embed": [0, 3]} and first.tied_pipe_ranks() == {"embed": [0]}
    embed, head = first.local_layers(0)[0][1], first.local_layers(3)[-1][1]
    assert embed is head is first.tied_modules["embed"]
    assert len([p for p in first.parameters() if p is first.tied_parameters("embed")[0]]) == 1
    assert stages[1].tied_parameters("embed") == []  # nothing tied on rank 1: no reduce needed


def test_bad_placement_names_the_fix():
    from pipegrid.pipe.module_grid import check_schedule_runs_module

    with pytest.raises(ValueError, match="stage placement must be one of loop, v, got 'zigzag'"):
        PipelineModule(gpt_layers(), pipe=2, pipe_rank=0, virtual_stages=2, stage_placement="zigzag")
    loop = PipelineModule(gpt_layers(), pipe=2, pipe_rank=0, virtual_stages=2)
    with pytest.raises(ValueError, match=r"schedule.name='zb_v' runs model stages placed 'v' .* built with "
                                         r"stage_placement='loop'; build it with PipelineModule\(\.\.\., "
                                         r"virtual_stages=2, stage_placement='v'\)"):
        check_schedule_runs_module("zb_v", loop)
    single = PipelineModule(gpt_layers(), pipe=2, pipe_rank=0)
    with pytest.raises(ValueError, match=r"virtual_stages=1 chunks per pipe rank, which schedule.name=.* runs, got "
                                         r"'dualpipev'; .* build the module with virtual_stages=2, stage_placement='v'"):
        check_schedule_runs_module("dualpipev", single)
    check_schedule_runs_module("interleaved_1f1b", loop)  # what the loop is for


def test_topology_sets_stages_and_describe_marks_local():
    model = PipelineModule(gpt_layers(), topology=Topology(pipe=2, data=2))
    assert model.pipe == 2 and model.pipe_rank == 0
    table = model.describe()
    assert "Embed[embed]" in table and "0*" in table and "\n1 " in table


def test_build_reference_ignores_layout():
    ref = build_reference(gpt_layers(), topology=Topology(pipe=2), pipe=2, pipe_rank=1,
                          virtual_stages=2, stage_placement="v", partition_method="type:Nothing")
    assert ref.num_model_stages == 1 and ref.parts == [0, 8]


def test_profile_partition():
    ids = gpt_batches(1)[0][0]
    model = PipelineModule(gpt_layers(n_layer=4), pipe=3, pipe_rank=0,
                           partition_method="profile", profile_input=ids)
    assert len(model.parts) == 4 and all(b > a for a, b in zip(model.parts, model.parts[1:]))
    with pytest.raises(ValueError, match="needs one example micro-batch"):
        PipelineModule(gpt_layers(), pipe=2, partition_method="profile")


def test_build_does_not_touch_the_global_rng():
    state = torch.random.get_rng_state()
    PipelineModule(gpt_layers(), pipe=2, pipe_rank=1)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"layers": []}, ValueError, "at least one layer"),
    ({"layers": [3]}, TypeError, r"layers\[0\] must be a LayerSpec"),
    ({"pipe": 9}, ValueError, "cannot split 8 layers into 9 parts"),
    ({"pipe": 2, "virtual_stages": 0}, ValueError, "virtual_stages must be an int >= 1"),
    ({"pipe": 2, "pipe_rank": 2}, ValueError, r"pipe_rank must be an int in \[0, 2\)"),
    ({"pipe": 0}, ValueError, "pipe must be an int >= 1"),
    ({"pipe": 3, "topology": Topology(pipe=2)}, ValueError, "disagrees with topology"),
    ({"partition_method": "nope"}, ValueError, "unknown partition method"),
    ({"activation_checkpoint_interval": -1}, ValueError, "must be an int >= 0"),
    ({"pipe": 2, "partition_method": "type:Conv"}, ValueError, "matches no layer"),
    ({"partition_costs": [1.0] * 8}, ValueError, "partition_costs is only read"),
    ({"layers": [TiedLayerSpec("e", Embed), TiedLayerSpec("e", Block)]}, ValueError,
     "reuses tied key 'e'"),
    ({"layers": [TiedLayerSpec("e", Embed, tied_weight_attr="tok.bias")]}, ValueError,
     "no attribute path 'tok.bias'.*tok.weight"),
    ({"layers": [TiedLayerSpec("e", Embed, tied_weight_attr="tok")]}, TypeError,
     "must name an nn.Parameter"),
])
def test_bad_input(kwargs, error, match):
    kwargs = {"layers": gpt_layers(), **kwargs}
    with pytest.raises(error, match=match):
        PipelineModule(**kwargs)
