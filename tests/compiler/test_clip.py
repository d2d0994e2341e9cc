"""Output-aware activation clipping: the chosen step never makes a layer's output error worse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitmix.compiler.clip import FACTORS, refine_activation_steps
from bitmix.compiler.qlayer import QuantLayer
from bitmix.ir.precision import Precision

torch.set_num_threads(1)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc = QuantLayer("fc", "linear", torch.randn(8, 16, generator=gen), torch.zeros(8))
        self.mm = QuantLayer("mm", "matmul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.mm(y.unsqueeze(-1), y.unsqueeze(-2))


def _q(v: torch.Tensor, step: float, q) -> torch.Tensor:
    return torch.round(torch.clamp(v / step, -q.q_n, q.q_p)) * step


def _output_errors(net: _Net, x: torch.Tensor, steps: tuple[float, float, float]) -> tuple[float, float]:
    """Each layer's output error at the given activation steps, on the inputs the refined net feeds it."""
    fc, mm = net.fc, net.mm
    fc_err = float((F.linear(_q(x, steps[0], fc.a_quant), fc.w_quant(fc.weight)) - F.linear(x, fc.weight))
                   .pow(2).sum())
    y = fc(x)
    a, b = y.unsqueeze(-1), y.unsqueeze(-2)
    mm_err = float((torch.matmul(_q(a, steps[1], mm.a_quant), _q(b, steps[2], mm.b_quant)) - a @ b).pow(2).sum())
    return fc_err, mm_err


@torch.no_grad()
def test_refined_steps_lower_each_layers_output_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=gen) * torch.linspace(0.1, 4.0, 16)  # channels of very different ranges
    net = _Net()
    for layer in (net.fc, net.mm):
        layer.set_bits(Precision(4, 4))
    net(x)  # MSE steps from the calibration batch
    before_steps = (float(net.fc.a_quant.step), float(net.mm.a_quant.step), float(net.mm.b_quant.step))
    chosen = refine_activation_steps(net, (x,))
    after_steps = (float(net.fc.a_quant.step), float(net.mm.a_quant.step), float(net.mm.b_quant.step))
    before, after = _output_errors(net, x, before_steps), _output_errors(net, x, after_steps)
    assert set(chosen) == {"fc", "mm"}
    assert all(f in FACTORS for f in (*chosen["fc"], *chosen["mm"]))
    assert after[0] <= before[0] and after[1] <= before[1]
    assert after[1] < before[1]  # the outer product of a wide-range vector wants another step than its MSE one
    assert after_steps[0] == pytest.approx(before_steps[0] * chosen["fc"][0], rel=1e-6)


@torch.no_grad()
def test_wide_activations_are_left_alone():
    net = _Net()
    for layer in (net.fc, net.mm):
        layer.set_bits(8)
    x = torch.randn(16, 16)
    net(x)
    steps = [float(q.step) for q in (net.fc.a_quant, net.mm.a_quant, net.mm.b_quant)]
    assert refine_activation_steps(net, (x,)) == {}
    assert [float(q.step) for q in (net.fc.a_quant, net.mm.a_quant, net.mm.b_quant)] == steps
