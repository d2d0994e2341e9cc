"""Online Hadamard rotation: the transform, float-exact folding, lower error at 4-bit inputs, kernels == fake quant."""

from __future__ import annotations

import torch
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.hadamard import hadamard
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.rotate import rotate_linears


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_hadamard_is_the_block_diagonal_sylvester_product_and_its_own_inverse_up_to_b():
    x = torch.randn(5, 3, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = torch.block_diag(*[_sylvester(16)] * 3)
    torch.testing.assert_close(hadamard(x, 16), x @ dense)
    torch.testing.assert_close(hadamard(hadamard(x, 16), 16), 16 * x)


class _Outliers(nn.Module):
    """fc1 and fc3 read signed inputs with a few channels 30x larger than the rest; fc2 reads a ReLU output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(64, 32)
        gain = torch.ones(64)
        gain[:2] = 30.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x * self.gain)
        return self.fc2(torch.relu(y)) + self.fc3(y * self.gain)


def _data(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(256, 64, generator=torch.Generator().manual_seed(seed)),)


def test_rotation_keeps_the_float_function_and_skips_non_negative_inputs():
    calib = _data(1)
    graph = capture(_Outliers().eval(), (calib[0][:2],))
    assert {layer.name: layer.input_nonneg for layer in graph.layers} == {"fc1": False, "fc2": True, "fc3": False}
    gm = prepare(graph)
    layers = quant_layers(gm)
    with torch.no_grad():
        before = gm(*calib)
        assert rotate_linears(layers, dict.fromkeys(layers, 4)) == 2
        torch.testing.assert_close(gm(*calib), before, rtol=1e-4, atol=1e-4)
    assert layers["fc2"].rotation_signs is None and layers["fc2"].input_nonneg


def test_only_narrow_activations_are_rotated_and_rotation_lowers_4_bit_error():
    calib, test = _data(2), _data(3)
    net = _Outliers().eval()
    gm = prepare(capture(net, (calib[0][:2],)))
    at8 = fake_quantize(gm, dict.fromkeys(quant_layers(gm), "4/8"), calib)
    assert all(layer.rotation_signs is None for layer in quant_layers(at8).values())
    at4 = fake_quantize(gm, dict.fromkeys(quant_layers(gm), 4), calib)
    assert [n for n, layer in quant_layers(at4).items() if layer.rotation_signs is not None] == ["fc1", "fc3"]
    assert all(layer.rotation_signs is None for layer in quant_layers(gm).values())  # input untouched
    plain = fake_quantize(gm, dict.fromkeys(quant_layers(gm), 4), calib, rotation=False)
    with torch.no_grad():
        ref = net(*test)
        errors = [float((m(*test) - ref).pow(2).mean()) for m in (plain, at4)]
    assert errors[1] < 0.5 * errors[0]


class _WeightOutliers(nn.Module):
    """A linear whose weight rows each carry a few entries 20x larger than the rest: one per-row 4-bit step
    spends its levels on them, and the rotation spreads them over the block."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(128, 64)
        with torch.no_grad():
            w = torch.randn(64, 128, generator=gen) * 0.05
            w[torch.arange(64), torch.randint(0, 128, (64,), generator=gen)] *= 20.0
            self.fc.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_rotated_4_8_pair_rotates_and_lowers_the_4_bit_weight_error():
    calib = (torch.randn(256, 128, generator=torch.Generator().manual_seed(6)),)
    test = torch.randn(256, 128, generator=torch.Generator().manual_seed(7))
    net = _WeightOutliers().eval()
    gm = prepare(capture(net, (calib[0][:2],)))
    plain = fake_quantize(gm, {"fc": "4/8"}, calib)
    rotated = fake_quantize(gm, {"fc": "4/8r"}, calib)
    assert quant_layers(plain)["fc"].rotation_signs is None
    assert quant_layers(rotated)["fc"].rotation_signs is not None
    with torch.no_grad():
        ref = net(test)
        errors = [float((m(test) - ref).pow(2).mean()) for m in (plain, rotated)]
    assert errors[1] < 0.5 * errors[0], errors


def test_rotated_layers_lower_bit_exactly():
    calib, test = _data(4), _data(5)
    gm = prepare(capture(_Outliers().eval(), (calib[0][:2],)))
    for bits in (4, 2, "2/4", "4/8r", "2/8r", "8/8r"):
        fq = fake_quantize(gm, dict.fromkeys(quant_layers(gm), bits), calib)
        assert any(layer.rotation_signs is not None for layer in quant_layers(fq).values())
        with torch.no_grad():
            assert torch.equal(lower(fq).module(*test), fq(*test))
