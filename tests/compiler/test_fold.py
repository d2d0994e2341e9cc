"""prepare: BN folding and QuantLayer insertion keep the float model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import QuantLayer, quant_layers

torch.set_num_threads(2)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def cnn():
    model, example, data = zoo.load("digits-cnn")
    graph = capture(model, example, "digits-cnn")
    return model, graph, prepare(graph), data


def test_digits_cnn_matches_original_on_a_batch(cnn):
    model, _, gm, data = cnn
    x = data.calibration(128)
    with torch.no_grad():
        assert _relative_error(gm(*x), model(*x)) < 1e-5
    assert data.evaluate(gm) == data.evaluate(model)


def test_batchnorm_is_folded_and_old_state_dropped(cnn):
    _, graph, gm, _ = cnn
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("batch_norm" in t for t in targets)
    keys = set(gm.state_dict())
    assert not any(k.startswith(("bn.", "stem.", "block1.")) for k in keys)
    layers = quant_layers(gm)
    assert list(layers) == list(graph.names)
    assert all(layer.bias is not None for name, layer in layers.items() if name != "fc")  # folded BN bias


def test_layer_mapping_and_nonneg_inputs(cnn):
    _, graph, gm, _ = cnn
    assert set(gm.bitmix_layers) == set(graph.names)
    for name, attr in gm.bitmix_layers.items():
        module = getattr(gm, attr)
        assert isinstance(module, QuantLayer) and module.name == name and module.bits is None
    layers = quant_layers(gm)
    assert not layers["stem"].a_nonneg  # raw input: unknown sign
    assert layers["block1.conv1"].a_nonneg and layers["fc"].a_nonneg  # after ReLU / pooling of ReLU


def test_user_model_and_export_untouched(cnn):
    model, graph, gm, _ = cnn
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fresh = prepare(graph)
    assert not torch.equal(fresh.bitmix_stem.weight, gm.bitmix_stem.weight)


def test_prepared_model_accepts_any_batch_and_deepcopies(cnn):
    _, graph, _, data = cnn
    gm = prepare(graph)
    clone = copy.deepcopy(gm)
    assert clone.bitmix_layers == gm.bitmix_layers
    with torch.no_grad():
        assert clone(data.calibration(7)[0]).shape == (7, 10)


def test_resnet18_matches_original():
    model, example, _ = zoo.load("resnet18")
    gm = prepare(capture(model, example, "resnet18"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative_error(gm(x), model(x)) < 1e-5
    assert len(quant_layers(gm)) == 21


@pytest.mark.slow
def test_minilm_matches_original_and_marks_softmax_nonneg():
    model, example, _ = zoo.load("minilm")
    gm = prepare(capture(model, example, "minilm"))
    with torch.no_grad():
        assert _relative_error(gm(*example), model(*example)) < 1e-5
    matmuls = [layer for layer in quant_layers(gm).values() if layer.kind == "matmul"]
    assert len(matmuls) == 12
    assert sum(layer.a_nonneg for layer in matmuls) == 6  # attention probabilities @ V


def test_conv1d_net_matches_original_with_batchnorm_folded():
    from tests.compiler.test_capture import Conv1dNet

    net = Conv1dNet().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 4, 40)  # another batch and length than captured
    gm = prepare(capture(net, (torch.randn(2, 4, 33),)))
    layers = quant_layers(gm)
    assert layers["stem"].weight.shape == (16, 4, 1, 5) and layers["stem"].bias is not None  # BN folded in
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in gm.modules())
    with torch.no_grad():
        assert _relative_error(gm(x), net(x)) < 1e-5


def test_decoder_with_transposed_convs_matches_original():
    from tests.compiler.test_capture import Decoder

    torch.manual_seed(0)
    net = Decoder().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    gm = prepare(capture(net, (torch.randn(2, 3, 12, 10),)))
    assert quant_layers(gm)["up"].weight.shape == (24, 8, 2, 2)
    assert not any("batch_norm" in str(node.target) for node in gm.graph.nodes)  # folded into the phases
    x = torch.randn(3, 3, 12, 10)
    with torch.no_grad():
        assert _relative_error(gm(x), net(x)) < 1e-5


def test_weight_second_matmuls_become_linears_with_the_same_function():
    from tests.compiler.test_capture import WeightSecond

    torch.manual_seed(0)
    net = WeightSecond().eval()
    gm = prepare(capture(net, (torch.randn(2, 7, 12),)))
    layers = quant_layers(gm)
    assert layers["addmm"].weight.shape == (16, 12) and layers["addmm"].bias is not None
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        assert _relative_error(gm(x), net(x)) < 1e-5
    before = net.w2.detach().clone()
    layers["matmul"].weight.data.mul_(2)  # a layer's weight is its own copy of W^T: the user's model keeps W
    assert torch.equal(net.w2, before)


def test_transposed_weight_second_matmuls_become_linears_of_that_weight():
    from tests.compiler.test_capture import TransposedWeightSecond

    torch.manual_seed(0)
    net = TransposedWeightSecond().eval()
    gm = prepare(capture(net, (torch.randn(2, 7, 12),)))
    layers = quant_layers(gm)
    assert torch.equal(layers["addmm"].weight, net.v1) and torch.equal(layers["mm"].weight, net.v3)
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        assert _relative_error(gm(x), net(x)) < 1e-5
    before = net.v2.detach().clone()
    layers["matmul"].weight.data.mul_(2)  # a layer's weight is its own copy of V: the user's model keeps V
    assert torch.equal(net.v2, before)


@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_after_a_transposed_conv_is_folded_into_its_phases(groups):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
            self.bn = nn.BatchNorm2d(6)
            self.line = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1, groups=groups)
            self.bn1 = nn.BatchNorm1d(4)

        def forward(self, x):
            y = torch.relu(self.bn(self.up(x)))
            return self.bn1(self.line(y.mean(2)))

    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn, net.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    gm = prepare(capture(net, (torch.randn(2, 4, 5, 6),)))
    assert not any("batch_norm" in str(node.target) for node in gm.graph.nodes)
    x = torch.randn(3, 4, 5, 6)
    with torch.no_grad():
        assert _relative_error(gm(x), net(x)) < 1e-5


class _Dropouts(nn.Module):
    """Dropout modules and a dtype cast: what torch.export keeps as no-op calls in an eval-mode graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.fc(x)))
        return nn.functional.dropout(y, 0.0) * mask.to(torch.float32)


def test_eval_dropouts_and_metadata_asserts_are_erased():
    net = _Dropouts().eval()
    example = (torch.randn(3, 8), torch.ones(3, 8, dtype=torch.int64))
    graph = capture(net, example)
    exported = {str(n.target) for n in graph.exported.graph_module.graph.nodes}
    assert "aten.dropout.default" in exported and "aten._assert_tensor_metadata.default" in exported
    gm = prepare(graph)
    targets = [str(n.target) for n in gm.graph.nodes]
    assert not any("dropout" in t or "_assert_tensor_metadata" in t for t in targets)
    x, mask = torch.randn(5, 8), torch.randint(0, 2, (5, 8))
    with torch.no_grad():
        assert torch.equal(gm(x, mask), net(x, mask))
