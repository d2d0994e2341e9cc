"""Per-row activation steps (bitmix.ir.row_steps): scale-free codes per token, exact lowering, lower error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.quantize import fake_quantize


class _Attention(nn.Module):
    """One self-attention block whose tokens differ in scale by ~30x, as a transformer's do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 32**0.5
        y = self.out(torch.softmax(scores, dim=-1) @ self.v(x))
        return self.conv(y.unsqueeze(1)).sum(1)


def _data(seed: int, n: int = 64) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.rand(n, 12, 1, generator=g))  # per-token scales over e^0 .. e^2
    return (torch.randn(n, 12, 32, generator=g) * scale,)


def test_a_row_step_scales_with_its_row_so_its_codes_do_not():
    q = LSQQuantizer(4, signed=True, axis=-1)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    q.init_range(x)
    scaled = x * torch.tensor([[1.0], [100.0], [0.01]])
    assert torch.equal(q.codes(scaled), q.codes(x))
    assert torch.equal(q.codes(torch.zeros(2, 16)), torch.zeros(2, 16, dtype=torch.int32))
    assert int(q.codes(x).abs().amax(dim=-1).min()) >= q.q_p - 1  # each row's max reaches the top codes


def test_4_bit_and_narrow_weight_linears_and_matmuls_step_per_row_convs_2_2_and_8_8_per_tensor():
    calib = _data(1)
    gm = prepare(capture(_Attention().eval(), (calib[0][:2],)))
    for bits, per_row in ((4, True), ("2/4", True), ("4/8", True), ("2/8", True), (2, False), (8, False)):
        fq = fake_quantize(gm, dict.fromkeys(quant_layers(gm), bits), calib)
        for layer in quant_layers(fq).values():
            axes = (layer.a_quant.axis, layer.b_quant.axis if layer.b_quant is not None else None)
            if layer.kind == "conv2d" or not per_row:
                assert axes == (None, None), (layer.name, bits)
            elif layer.kind == "matmul":
                assert axes == (-1, -2), (layer.name, bits)
            else:
                assert axes[0] == -1, (layer.name, bits)


@pytest.mark.parametrize("bits", [4, 2, "2/4", "4/8", "2/8"])
def test_row_stepped_layers_lower_bit_exactly(bits):
    calib, test = _data(2), _data(3, 5)
    gm = prepare(capture(_Attention().eval(), (calib[0][:2],)))
    fq = fake_quantize(gm, dict.fromkeys(quant_layers(gm), bits), calib)
    with torch.no_grad():
        assert torch.equal(lower(fq).module(*test), fq(*test))


def test_row_steps_lower_the_4_bit_error_on_tokens_of_different_scales():
    calib, test = _data(4), _data(5)
    net = _Attention().eval()
    gm = prepare(capture(net, (calib[0][:2],)))
    fq = fake_quantize(gm, dict.fromkeys(quant_layers(gm), 4), calib)
    per_tensor = fake_quantize(gm, dict.fromkeys(quant_layers(gm), 4), calib)
    for layer in quant_layers(per_tensor).values():  # the same model with one step per tensor
        for name in ("a_quant", "b_quant"):
            q = getattr(layer, name)
            if q is not None and q.axis is not None:
                setattr(layer, name, LSQQuantizer(q.bits, not layer.input_nonneg if name == "a_quant"
                                                  else not layer.b_nonneg))
    with torch.no_grad():
        per_tensor(*calib)  # calibrate the replaced quantizers
        ref = net(*test)
        errors = [float((m(*test) - ref).pow(2).mean()) for m in (per_tensor, fq)]
    assert errors[1] < 0.7 * errors[0], errors
