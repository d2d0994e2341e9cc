"""The exported copy: weight / spectral norm baked to plain parameters, the user's model untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bitmix
from bitmix.compiler.capture import capture


def test_parametrized_weights_are_baked_into_plain_layers():
    """Weight / spectral norm compute a weight in the forward pass; the layers must still be layers (a weight-normed
    linear used to stay FP32 without a report) and the user's model must keep its parametrizations."""
    from torch.nn.utils import parametrizations

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = parametrizations.weight_norm(nn.Linear(8, 16))
            self.b = parametrizations.spectral_norm(nn.Linear(16, 4))
            self.conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
            with warnings.catch_warnings():  # the hook-based forms torch deprecates, still in older models
                warnings.simplefilter("ignore")
                self.c = nn.utils.weight_norm(nn.Linear(4, 4))
                self.d = nn.utils.spectral_norm(nn.Linear(4, 3))

        def forward(self, x, img):
            return self.d(self.c(self.b(torch.relu(self.a(x))))), self.conv(img)

    torch.manual_seed(0)
    net = Net().eval()
    x, img = torch.randn(2, 8), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = net(x, img)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph = capture(net, (x, img))
    assert [(layer.name, layer.kind) for layer in graph.layers] == [
        ("a", "linear"), ("b", "linear"), ("c", "linear"), ("d", "linear"), ("conv", "conv2d")]
    assert not graph.unsupported
    with torch.no_grad():
        out = graph.exported.module()(x, img)
        assert all(torch.allclose(o, r, atol=1e-6) for o, r in zip(out, ref, strict=True))
        assert all(torch.equal(o, r) for o, r in zip(net(x, img), ref, strict=True))  # the user's model still runs
    assert type(net.a).__name__ == "ParametrizedLinear" and hasattr(net.c, "weight_g")
    assert before.keys() == net.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_pruned_weights_are_baked_with_their_zeros():
    """`torch.nn.utils.prune` keeps the masked weight as a computed attribute: `copy.deepcopy` refused such a
    model (a traceback from compile) and the layer's weight was not a parameter."""
    from torch.nn.utils import prune

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.conv, self.b = nn.Linear(16, 32), nn.Conv1d(32, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.conv(torch.relu(self.a(x)).transpose(1, 2)).mean(-1))

    torch.manual_seed(0)
    net = Net().eval()
    prune.l1_unstructured(net.a, "weight", 0.5)
    prune.random_unstructured(net.conv, "weight", 0.3)
    prune.l1_unstructured(net.conv, "weight", 0.3)  # a second pruning of one tensor: a PruningContainer
    prune.l1_unstructured(net.b, "bias", 0.5)
    x = torch.randn(4, 5, 16)
    graph = capture(net, (x,))
    assert graph.names == ("a", "conv", "b") and not graph.unsupported
    state = graph.exported.state_dict
    assert int((state["a.weight"] == 0).sum()) == 256 and torch.equal(state["a.weight"], net.a.weight)
    assert torch.equal(state["conv.weight"], net.conv.weight) and torch.equal(state["b.bias"], net.b.bias)
    with torch.no_grad():
        assert torch.allclose(graph.exported.module()(x), net(x), atol=1e-6)
    assert hasattr(net.a, "weight_mask") and hasattr(net.b, "bias_orig")  # the user's model is still pruned


def test_a_model_in_training_mode_compiles_its_eval_behaviour_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].running_mean.normal_()
    x = torch.randn(32, 8)
    with pytest.warns(UserWarning, match=r"training mode \(1 \(BatchNorm1d\), 2 \(Dropout\)\)"):
        cm = bitmix.compile(model, (x,), "int8-npu", data=x)
    assert model.training and model[1].training  # the user's model untouched
    with torch.no_grad():
        ref = model.eval()(x)
        assert float(nn.functional.cosine_similarity(cm(x), ref, dim=1).mean()) > 0.99
    assert any("training mode" in w for w in cm.report.warnings)
    again = bitmix.compile(model, (x,), "int8-npu", data=x)  # now in eval mode: nothing to say
    assert not any("training mode" in w for w in again.report.warnings)
