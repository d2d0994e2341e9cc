"""GPTQ weight rounding: the Hessian's layout matches torch's conv, the rounding lowers the output error
on correlated inputs, reduces to round-to-nearest on uncorrelated ones, and lowers bit-exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.gptq import dequant, gptq_weights, hessians, output_error
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import QuantLayer, quant_layers
from bitmix.compiler.quantize import fake_quantize


def _correlated(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose k channels mix a few shared factors (as real activations do)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, k, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 4, generator=gen) @ mix + 0.1 * torch.randn(n, k, generator=gen)


def test_hessian_error_equals_the_conv_output_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 2, 3, 3, generator=gen)
    layer = QuantLayer("c", "conv2d", w, stride=(2, 2), padding=(1, 1), groups=4)
    x = torch.randn(6, 8, 9, 9, generator=gen)
    d = 0.01 * torch.randn(8, 2, 3, 3, generator=gen)
    even, odd = hessians(layer, x)
    g = (w.reshape(4, 2, -1), (w + d).reshape(4, 2, -1))
    for part, h in ((x[0::2], even), (x[1::2], odd)):
        diff = F.conv2d(part.double(), (w + d).double() - w.double(), None, 2, 1, 1, 4)
        torch.testing.assert_close(output_error(*g, h), float(diff.pow(2).sum()), rtol=1e-5, atol=0)  # float32 products


def test_gptq_lowers_held_out_error_on_correlated_inputs():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).unsqueeze(0)
    step = (w.abs().amax(dim=-1, keepdim=True) / 7).float()
    fit, test = _correlated(2048, 64, 2).double(), _correlated(2048, 64, 3).double()
    h_fit, h_test = (fit.T @ fit).unsqueeze(0), (test.T @ test).unsqueeze(0)
    compensated = gptq_weights(w, step, h_fit, 8, 7)
    assert compensated is not None
    gptq = output_error(w, dequant(compensated, step, 8, 7), h_test)
    rtn = output_error(w, dequant(w, step, 8, 7), h_test)
    assert gptq < 0.5 * rtn  # measured ~0.2x


def test_gptq_is_round_to_nearest_when_inputs_are_uncorrelated():
    w = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(4))
    step = w.abs().amax(dim=-1, keepdim=True) / 7
    h = torch.diag_embed(torch.rand(2, 24, dtype=torch.float64) + 0.5)
    compensated = gptq_weights(w, step, h, 8, 7)
    assert compensated is not None
    assert torch.equal(dequant(compensated, step, 8, 7), dequant(w, step, 8, 7))


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_gptq_layers_are_closer_to_float_and_lower_bit_exactly():
    net = _Mixed().eval()
    calib, test = (_correlated(256, 32, 5),), (_correlated(256, 32, 6),)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: "4/8" for n in quant_layers(gm)}
    before = {n: layer.weight.detach().clone() for n, layer in quant_layers(gm).items()}
    plain = fake_quantize(gm, assignment, calib, rounding=False)
    rounded = fake_quantize(gm, assignment, calib)
    changed = [n for n, layer in quant_layers(rounded).items()
               if not torch.equal(layer.weight, quant_layers(plain)[n].weight)]
    assert changed  # GPTQ kept on at least one layer
    assert all(torch.equal(layer.weight, before[n]) for n, layer in quant_layers(gm).items())  # input untouched
    with torch.no_grad():
        ref = net(*test)
        err_plain = float((plain(*test) - ref).pow(2).mean())
        err_rounded = float((rounded(*test) - ref).pow(2).mean())
        assert err_rounded < err_plain
        assert torch.equal(lower(rounded).module(*test), rounded(*test))


def test_8_bit_weights_keep_round_to_nearest():
    net = _Mixed().eval()
    calib = (_correlated(256, 32, 5),)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: 8 for n in quant_layers(gm)}
    plain = fake_quantize(gm, assignment, calib, rounding=False)
    rounded = fake_quantize(gm, assignment, calib)
    assert all(torch.equal(layer.weight, quant_layers(plain)[n].weight) for n, layer in quant_layers(rounded).items())


def test_step_search_keeps_each_rows_best_held_out_step():
    from bitmix.compiler.gptq import row_errors, search_steps

    w = torch.randn(1, 24, 48, generator=torch.Generator().manual_seed(7))
    step = (w.abs().amax(dim=-1, keepdim=True) / 7).float()
    fit, test = _correlated(1024, 48, 8).double(), _correlated(1024, 48, 9).double()
    h_fit, h_test = (fit.T @ fit).unsqueeze(0), (test.T @ test).unsqueeze(0)
    grid = (0.6, 0.8, 1.0, 1.2)
    searched = search_steps(w, step, h_fit, h_test, 8, 7, grid)
    assert searched is not None
    chosen, weights = searched
    errors = []
    for c in grid:
        s = step * c
        trial = gptq_weights(w, s, h_fit, 8, 7)
        assert trial is not None
        errors.append(row_errors(w, dequant(trial, s, 8, 7), h_test))
    best = torch.stack(errors).amin(dim=0)
    torch.testing.assert_close(row_errors(w, dequant(weights, chosen, 8, 7), h_test), best)
    ratios = (chosen / step).flatten()
    assert all(any(abs(float(r) - c) < 1e-6 for c in grid) for r in ratios)
    assert len({round(float(r), 6) for r in ratios}) > 1  # rows differ in their best step
    only_mse = search_steps(w, step, h_fit, h_test, 8, 7, (1.0,))
    assert only_mse is not None and torch.equal(only_mse[0], step)
    assert torch.equal(only_mse[1], gptq_weights(w, step, h_fit, 8, 7))


def test_searched_steps_lower_bit_exactly():
    net = _Mixed().eval()
    calib, test = (_correlated(256, 32, 5),), (_correlated(64, 32, 6),)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: "4/8" for n in quant_layers(gm)}
    plain = fake_quantize(gm, assignment, calib, rounding=False)
    rounded = fake_quantize(gm, assignment, calib)
    moved = [n for n, layer in quant_layers(rounded).items()
             if not torch.equal(layer.w_quant.step, quant_layers(plain)[n].w_quant.step)]
    assert moved  # some row left its MSE step
    with torch.no_grad():
        assert torch.equal(lower(rounded).module(*test), rounded(*test))


def test_inverse_factor_is_the_damped_inverse_hessians_upper_cholesky():
    from bitmix.compiler.gptq import DAMP, inverse_factor

    x = _correlated(512, 40, 10).double()
    h = torch.stack([x.T @ x, 2 * x.T @ x + torch.eye(40, dtype=torch.float64)])
    u = inverse_factor(h)
    assert u is not None and torch.equal(u, u.triu())
    damped = h + DAMP * h.diagonal(dim1=-2, dim2=-1).mean(dim=-1).reshape(-1, 1, 1) * torch.eye(40, dtype=h.dtype)
    torch.testing.assert_close(u.transpose(1, 2) @ u, torch.linalg.inv(damped))


def test_step_search_is_the_same_in_any_number_of_stacked_chunks(monkeypatch):
    from bitmix.compiler import gptq

    w = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(11))
    step = (w.abs().amax(dim=-1, keepdim=True) / 7).float()
    fit, test = _correlated(512, 32, 12).double(), _correlated(512, 32, 13).double()
    h_fit, h_test = torch.stack([fit.T @ fit] * 2), torch.stack([test.T @ test] * 2)
    stacked = gptq.search_steps(w, step, h_fit, h_test, 8, 7)
    monkeypatch.setattr(gptq, "MAX_STACK", 1)  # one candidate step per compensate pass
    one_by_one = gptq.search_steps(w, step, h_fit, h_test, 8, 7)
    assert stacked is not None and one_by_one is not None
    assert torch.equal(stacked[0], one_by_one[0]) and torch.equal(stacked[1], one_by_one[1])


def test_held_out_rows_judge_as_their_hessian_does():
    """Fewer held-out rows than input columns: the error goes through the rows, not the K x K Hessian, with the
    same values and the same step choices; more rows: the Hessian itself."""
    from bitmix.compiler.gptq import Rows, held_out, row_errors, search_steps

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(1, 16, 64, generator=gen)
    layer = QuantLayer("l", "linear", w[0])
    step = (w.abs().amax(dim=-1, keepdim=True) / 7).float()
    x = _correlated(40, 64, 14).reshape(2, 20, 64)  # 2 examples of 20 tokens: 20 held-out rows < 64 columns
    fit, test = hessians(layer, x)
    judge = held_out(layer, x, test)
    assert isinstance(judge, Rows) and judge.x.shape == (1, 20, 64)
    rounded = dequant(w, step, 8, 7)
    torch.testing.assert_close(row_errors(w, rounded, judge), row_errors(w, rounded, test), rtol=1e-5, atol=0)
    by_rows, by_h = search_steps(w, step, fit, judge, 8, 7), search_steps(w, step, fit, test, 8, 7)
    assert by_rows is not None and by_h is not None
    assert torch.equal(by_rows[0], by_h[0]) and torch.equal(by_rows[1], by_h[1])
    many = _correlated(200, 64, 15).reshape(2, 100, 64)
    h_many = hessians(layer, many)[1]
    assert held_out(layer, many, h_many) is h_many
