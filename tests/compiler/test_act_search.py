"""Activation steps chosen by the layer's output error: the best of the grid, finer where an outlier channel
meets zero weights, the same integer work in the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.act_search import output_step, search_activation_steps
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.quantize import fake_quantize


def _error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, q: LSQQuantizer) -> float:
    xq = torch.round(torch.clamp(x / s, -q.q_n, q.q_p)) * s
    return float(F.linear(xq - x, w).pow(2).sum())


def _outlier_inputs(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=gen)
    x[:, 0] *= 40.0  # one outlier channel
    return x


def test_output_step_is_the_grid_minimum_and_ignores_a_channel_no_weight_reads():
    x = _outlier_inputs(0)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 0.0  # the outlier channel reaches no output
    q = LSQQuantizer(8, signed=True)
    q.init_range(x)
    mse = q.step.detach().clone()
    grid = (0.5, 0.75, 1.0, 1.25)
    chosen = output_step(x, w, q, grid)
    errors = [_error(x, w, mse * c, q) for c in grid]
    assert _error(x, w, chosen, q) == min(errors)
    assert float(chosen) < float(mse)  # the outlier's range is not needed: a finer step wins
    w[:, 0] = 1.0  # now the outlier matters as much as any channel
    assert float(output_step(x, w, q, (1.0,))) == float(mse)


def test_many_rows_screen_the_grid_on_a_quarter_and_keep_the_exhaustive_choice():
    """With >= `screen.MIN_ROWS` rows each candidate step is judged on every 4th row and only the best `screen.KEEP`
    on all rows (the R x K x C product per candidate was the search's cost); here the choice is the full grid's."""
    from bitmix.compiler import act_search, screen

    x = torch.cat([_outlier_inputs(seed) for seed in range(4)])  # 2048 rows
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    q = LSQQuantizer(8, signed=True)
    q.init_range(x)
    mse = q.step.detach().clone()
    seen: list[int] = []
    plain = q.dequantized

    def counted(v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        seen.append(v.shape[0])
        return plain(v, step)

    q.dequantized = counted  # type: ignore[method-assign]
    chosen = output_step(x, w, q)
    assert seen.count(x.shape[0]) == screen.KEEP and seen.count(x.shape[0] // screen.EVERY) == len(act_search.GRID)
    errors = [_error(x, w, mse * c, q) for c in act_search.GRID]
    assert _error(x, w, chosen, q) == min(errors)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_search_sets_every_step_and_lowers_bit_exactly():
    calib, test = (_outlier_inputs(2),), (_outlier_inputs(3)[:32],)
    gm = prepare(capture(_Net().eval(), (calib[0][:2],)))
    assignment = {n: 8 for n in quant_layers(gm)}
    searched = fake_quantize(gm, assignment, calib, rounding=False, bias_correction=False)
    plain = fake_quantize(gm, assignment, calib, rounding=False, bias_correction=False, activation_search=False)
    steps = {n: (float(a.a_quant.step.detach()), float(b.a_quant.step.detach()))
             for (n, a), b in zip(quant_layers(searched).items(), quant_layers(plain).values(), strict=True)}
    assert any(s != p for s, p in steps.values())
    with torch.no_grad():
        assert torch.equal(lower(searched).module(*test), searched(*test))


def test_search_sets_the_output_step_and_leaves_float_layers_alone():
    calib = (_outlier_inputs(4),)
    gm = prepare(capture(_Net().eval(), (calib[0][:2],)))
    layers = quant_layers(gm)
    first = next(iter(layers))
    for name, layer in layers.items():
        layer.set_bits(8 if name == first else None)
    q = LSQQuantizer(8, signed=True)
    q.init_range(calib[0])
    mse = q.step.detach().clone()
    with torch.no_grad():
        expected = output_step(calib[0], layers[first].w_quant(layers[first].weight), q)
    moved = search_activation_steps(gm, layers, calib)
    assert torch.equal(layers[first].a_quant.step.detach(), expected)
    assert moved == int(not torch.equal(expected, mse))
    assert all(layer.a_quant is None for name, layer in layers.items() if name != first)


def test_layers_with_narrower_weights_keep_the_mse_step():
    calib = (_outlier_inputs(5),)
    gm = prepare(capture(_Net().eval(), (calib[0][:2],)))
    assignment = {n: "4/8" for n in quant_layers(gm)}
    searched = fake_quantize(gm, assignment, calib, rounding=False, bias_correction=False)
    plain = fake_quantize(gm, assignment, calib, rounding=False, bias_correction=False, activation_search=False)
    for a, b in zip(quant_layers(searched).values(), quant_layers(plain).values(), strict=True):
        assert torch.equal(a.a_quant.step, b.a_quant.step)


def test_output_step_through_the_gram_matrix_finds_the_same_minimum_for_wide_layers():
    x = _outlier_inputs(0)
    w = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))  # more outputs than inputs: Gram form
    q = LSQQuantizer(8, signed=True)
    q.init_range(x)
    mse = q.step.detach().clone()
    grid = tuple(0.5 + 0.05 * i for i in range(21))
    errors = [_error(x, w, mse * c, q) for c in grid]
    assert _error(x, w, output_step(x, w, q, grid), q) <= min(errors) * (1 + 1e-5)
