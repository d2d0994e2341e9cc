"""Empirical bias correction against plain torch: the mean output error on calibration data vanishes."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitmix.compiler import qlayer
from bitmix.compiler.capture import capture
from bitmix.compiler.correct import correct_biases, float_reference
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5)).eval()


def test_agreed_shift_keeps_what_examples_agree_on():
    from bitmix.compiler.correct import agreed_shift

    systematic = torch.tensor([[0.5, -2.0]]).repeat(6, 1).double()
    assert torch.equal(agreed_shift(systematic), systematic[0])  # no spread: corrected in full
    noise = torch.tensor([[1.0, -3.0], [-1.0, 3.0]]).repeat(3, 1).double()
    assert torch.equal(agreed_shift(noise), torch.zeros(2, dtype=torch.float64))  # mean 0: nothing to correct
    assert torch.equal(agreed_shift(systematic[:1]), torch.zeros(2, dtype=torch.float64))  # one example: unknown
    mixed = systematic + 0.5 * noise
    delta, se2 = mixed.mean(0), mixed.var(0) / 6
    torch.testing.assert_close(agreed_shift(mixed), delta * (1 - se2 / delta**2).clamp(min=0))


def test_bias_correction_lowers_mean_output_error_on_calibration(monkeypatch):
    # on the plain -2..1 grid (the linear's signed input would otherwise go mid-rise, whose symmetric levels
    # shift the mean much less): the systematic shift is what the correction removes
    monkeypatch.setattr(qlayer, "MIDRISE_BITS", 0)
    net = _net()
    calib = (torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)
    gm = prepare(capture(net, (calib[0][:2],)))
    # without GPTQ rounding, which changes the weights' float function (the reference here is `net`), and with
    # the plain MSE activation steps: the correction alone is under test
    plain = fake_quantize(gm, {n: 2 for n in quant_layers(gm)}, calib, bias_correction=False, rounding=False,
                          activation_search=False)
    fixed = copy.deepcopy(plain)
    means, _ = float_reference(fixed, calib)
    assert correct_biases(fixed, means, calib) == 3
    with torch.no_grad():
        ref = net(*calib)
        err_plain = (plain(*calib) - ref).mean(0)
        err_fixed = (fixed(*calib) - ref).mean(0)
    assert float(err_plain.abs().max()) > 1e-3  # 2-bit rounding does shift the mean
    assert float(err_fixed.abs().max()) < 0.5 * float(err_plain.abs().max())
    layers = quant_layers(fixed)
    assert layers[list(layers)[1]].bias is not None  # the bias-free conv got one
    assert quant_layers(gm)[list(layers)[1]].bias is None  # the input module is untouched


def test_guarded_correction_never_raises_the_calibration_error():
    net = _net()
    calib = (torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(5)),)
    gm = prepare(capture(net, (calib[0][:2],)))
    for bits in (2, 4, 8):
        assignment = {n: bits for n in quant_layers(gm)}
        # without GPTQ rounding, which can flip the equalised-or-plain choice between the two calls
        plain = fake_quantize(gm, assignment, calib, bias_correction=False, rounding=False)
        guarded = fake_quantize(gm, assignment, calib, rounding=False)
        with torch.no_grad():
            ref = net(*calib)
            assert float((guarded(*calib) - ref).pow(2).sum()) <= float((plain(*calib) - ref).pow(2).sum())


def test_bias_correction_needs_calibration_and_keeps_steps():
    net = _net()
    calib = (torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2)),)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: 4 for n in quant_layers(gm)}
    # without GPTQ rounding, whose effect on the error can flip the equalised-or-plain choice (other steps)
    plain = fake_quantize(gm, assignment, calib, bias_correction=False, rounding=False)
    fixed = fake_quantize(gm, assignment, calib, rounding=False)
    for a, b in zip(quant_layers(plain).values(), quant_layers(fixed).values(), strict=True):
        assert torch.equal(a.a_quant.step, b.a_quant.step) and torch.equal(a.w_quant.step, b.w_quant.step)


def test_correction_that_only_fits_its_own_examples_is_refused():
    """A shift seen on the fitted (even) examples but not on the held-out (odd) ones is not applied."""
    from bitmix.compiler.correct import bias_correct

    net = _net()
    calib = (torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(3)),)
    gm = prepare(capture(net, (calib[0][:2],)))
    model = fake_quantize(gm, {n: 8 for n in quant_layers(gm)}, calib, bias_correction=False)
    means, output = float_reference(model, calib)
    fake = {k: m + torch.tensor([5.0, 0.0]).repeat(4).reshape(8, 1).double() for k, m in means.items()}
    before = {n: None if q.bias is None else q.bias.clone() for n, q in quant_layers(model).items()}
    assert not bias_correct(model, (fake, output), calib)
    for name, layer in quant_layers(model).items():
        assert (layer.bias is None) == (before[name] is None)
        assert before[name] is None or torch.equal(layer.bias, before[name])


def test_live_rows_restrict_channel_means():
    from bitmix.compiler.correct import example_means
    from bitmix.compiler.qlayer import QuantLayer

    layer = QuantLayer("fc", "linear", torch.zeros(3, 2))
    out = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    live = torch.tensor([[True, True, False, False], [False, False, False, False]])
    means = example_means(layer, out, live)
    torch.testing.assert_close(means[0], out[0, :2].double().mean(0))
    assert torch.equal(means[1], torch.zeros(3, dtype=torch.float64))  # no live row: no shift either way
    assert torch.equal(example_means(layer, out, None), out.double().mean(1))


def test_bias_correction_ignores_what_dead_rows_hold():
    """With live rows, what a padded position computes does not change the correction."""
    from bitmix.compiler.live import live_rows
    from tests.compiler.test_live import _batch, _Padded

    x, mask = _batch(16, 3)
    gm = prepare(capture(_Padded().eval(), (x[:2], mask[:2])))
    plain = fake_quantize(gm, {n: 2 for n in quant_layers(gm)}, (x, mask), bias_correction=False, rounding=False,
                          activation_search=False)
    live = live_rows(plain, quant_layers(plain), (x, mask))
    biases = []
    for junk in (0.0, 50.0):  # whatever the padded tokens hold
        xj = torch.where(mask.bool().unsqueeze(-1), x, junk)
        fixed = copy.deepcopy(plain)
        means, _ = float_reference(fixed, (xj, mask), live)
        assert correct_biases(fixed, means, (xj, mask), live) == 2
        biases.append({n: layer.bias.detach().clone() for n, layer in quant_layers(fixed).items()})
    for name, bias in biases[0].items():
        torch.testing.assert_close(bias, biases[1][name], rtol=0, atol=1e-6)


def test_static_and_symbolic_batch_captures_get_the_same_correction():
    """The correction is fitted on half the examples and checked on the other half in both shape modes (a
    static capture was fitted and checked on all of them, so its biases, and its answers, differed by 9e-3)."""
    from bitmix.compiler.qlayer import fixed_batch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.RMSNorm(32), nn.GELU(), nn.Linear(32, 16)).eval()
    x = torch.randn(4, 6, 16)
    static, symbolic = prepare(capture(net, (x,), "m", None)), prepare(capture(net, (x,), "m"))
    assert fixed_batch(static) == 4 and fixed_batch(symbolic) is None
    outs = []
    for gm in (static, symbolic):
        with torch.no_grad():
            outs.append(fake_quantize(gm, {n: 8 for n in quant_layers(gm)}, (x,))(x))
    assert torch.equal(*outs)
