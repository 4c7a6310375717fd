"""LayerSpec and TiedLayerSpec: deferred builds, meta-device parameter counts, checks."""

import pytest
import torch
from torch import nn

from pipegrid.pipe.spec import LayerSpec, TiedLayerSpec


class Recorder(nn.Module):
    """Remembers the device of every construction."""

    devices: list = []

    def __init__(self, width, *, bias=True):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=bias)
        Recorder.devices.append(self.fc.weight.device.type)


def test_build_passes_arguments():
    spec = LayerSpec(nn.Linear, 4, 3, bias=False)
    layer = spec.build()
    assert isinstance(layer, nn.Linear) and layer.bias is None
    assert layer.weight.shape == (3, 4)
    assert spec.cls is nn.Linear and spec.typename is nn.Linear
    assert spec.class_name == "Linear" and "Linear, 4, 3, bias=False" in repr(spec)


def test_num_parameters_builds_on_meta_only_and_keeps_rng():
    Recorder.devices = []
    state = torch.random.get_rng_state()
    spec = LayerSpec(Recorder, 5, bias=False)
    assert spec.num_parameters() == 25
    assert spec.num_parameters() == 25  # cached: one meta build
    assert Recorder.devices == ["meta"]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tied_spec_attributes():
    spec = TiedLayerSpec("embed", nn.Embedding, 16, 8)
    assert spec.key == "embed" and spec.forward_fn is None
    assert spec.tied_weight_attrs == ("weight",) and spec.tied_weight_attr == "weight"
    several = TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr=["weight", "bias"])
    assert several.tied_weight_attrs == ("weight", "bias")
    dotted = TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr="fc.weight")
    assert dotted.tied_weight_attr == "fc.weight"
    assert isinstance(dotted.build(), nn.Linear) and "TiedLayerSpec('k'" in repr(dotted)


def test_not_a_class():
    with pytest.raises(TypeError, match="LayerSpec needs an nn.Module class"):
        LayerSpec(nn.Linear(2, 2).weight)


def test_factory_must_return_a_module():
    with pytest.raises(TypeError, match="must build an nn.Module.*plain functions"):
        LayerSpec(lambda: 3).build()


@pytest.mark.parametrize("key", ["", "a.b"])
def test_bad_tied_key(key):
    with pytest.raises(ValueError, match="non-empty name without '.'"):
        TiedLayerSpec(key, nn.Linear, 2, 2)


def test_bad_tied_arguments():
    with pytest.raises(TypeError, match="key must be a str"):
        TiedLayerSpec(3, nn.Linear, 2, 2)
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        TiedLayerSpec("k", nn.Linear, 2, 2, forward_fn=3)
    with pytest.raises(TypeError, match="tied_weight_attr must be a str or a list"):
        TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr=[1])
    with pytest.raises(ValueError, match="at least one attribute path"):
        TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr=[])
