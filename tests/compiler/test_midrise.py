"""The mid-rise grid for signed 2-bit linear inputs: chosen by MSE, folded into the bias, kernels == fake quant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitmix import kernels
from bitmix.compiler import qlayer, ranges
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import lower
from bitmix.compiler.portable import portable
from bitmix.compiler.qlayer import qrange, quant_layers
from bitmix.compiler.quantize import fake_quantize


class _Mixed(nn.Module):
    """fc1 reads a signed input, fc2 a ReLU output, conv a signed input through zero padding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.reshape(-1, 4, 4, 4)).reshape(-1, 64)
        return self.fc2(torch.relu(self.fc1(y)))


def _data(seed: int, n: int = 256) -> tuple[torch.Tensor]:
    return (torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)),)


def test_grid_choice_follows_the_error():
    gauss = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    signed, midrise, step = ranges.activation_grid(gauss, 2, True, midrise=True)
    assert signed and midrise
    plain = ranges.mse_steps(gauss.unsqueeze(0), *qrange(2, True))
    plain_error = float(ranges.quant_error(gauss.unsqueeze(0), plain, *qrange(2, True))[0])
    mid_error = float(ranges.quant_error(gauss.unsqueeze(0), step.reshape(1, 1), *qrange(2, True), midrise=True)[0])
    assert mid_error < 0.85 * plain_error  # measured 0.119 sigma^2 (the optimal uniform 4 levels) vs 0.149
    assert ranges.activation_grid(gauss.relu(), 2, True, midrise=True)[:2] == (False, False)
    assert ranges.activation_grid(gauss, 2, True, midrise=False)[1] is False


def _quantized(calib: tuple[torch.Tensor], bits: dict[str, int] | None = None) -> nn.Module:
    graph = capture(_Mixed().eval(), (calib[0][:2],))
    return fake_quantize(prepare(graph), bits or dict.fromkeys(graph.names, 2), calib)


def test_only_signed_linear_inputs_go_mid_rise():
    layers = quant_layers(_quantized(_data(1)))
    assert {name: bool(layer.a_quant.midrise) for name, layer in layers.items()} == {
        "conv": False, "fc1": True, "fc2": False}


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
def test_kernels_equal_fake_quant_on_the_mid_rise_grid(path):
    if path not in kernels.dispatch.available_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    fq = _quantized(_data(1))
    x = _data(2, 8)
    with torch.no_grad(), kernels.dispatch.use(path):
        ref = fq(*x)
        assert torch.equal(lower(fq).module(*x), ref)
        assert torch.equal(portable(lower(fq).module)(*x), ref)
        fq.train()  # the float fake-quant path (what fine-tuning sees) agrees up to float rounding
        torch.testing.assert_close(fq(*x), ref, rtol=1e-4, atol=1e-4)


def test_mid_rise_lowers_the_output_error(monkeypatch):
    """fc1 alone at 2/2 (its input the 8-bit conv's roughly Gaussian output): the mid-rise grid's lower
    quantization MSE shows in the model's output."""
    calib, test = _data(1), _data(3)
    model, bits = _Mixed().eval(), {"conv": 8, "fc1": 2, "fc2": 8}
    with torch.no_grad():
        want = model(*test)
        mid = float((_quantized(calib, bits)(*test) - want).pow(2).sum())
        monkeypatch.setattr(qlayer, "MIDRISE_BITS", 0)
        plain_model = _quantized(calib, bits)
        assert not any(bool(q.a_quant.midrise) for q in quant_layers(plain_model).values())
        plain = float((plain_model(*test) - want).pow(2).sum())
    assert mid < 0.95 * plain  # measured 10.8 vs 12.0
