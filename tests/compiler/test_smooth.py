"""Scale migration (SmoothQuant, AWQ): float-exact, lower error on outlier channels, kernels == fake quant."""

from __future__ import annotations

import torch
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.smooth import choose_scale, smooth_linears


class _Outliers(nn.Module):
    """A linear whose input has a few channels 50x larger than the rest (as after a transformer's LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 16)
        gain = torch.ones(32)
        gain[:3] = 50.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x * self.gain)


def _calib(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(512, 32, generator=torch.Generator().manual_seed(seed)),)


def test_scale_is_chosen_for_outlier_channels_and_not_for_flat_ones():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    flat = torch.randn(256, 32, generator=gen)
    outliers = flat * torch.cat([torch.full((3,), 50.0), torch.ones(29)])
    s = choose_scale(outliers, w, 4, True)
    assert s is not None and float(s[:3].min()) > float(s[3:].max())  # outlier channels are scaled down most
    assert choose_scale(torch.zeros(8, 32), w, 8, True) is None  # nothing to gain


def test_smoothed_model_is_closer_to_float_and_lowers_bit_exactly():
    net = _Outliers().eval()
    calib, test = _calib(1), _calib(2)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: 8 for n in quant_layers(gm)}
    plain = fake_quantize(gm, assignment, calib, smoothing=False)
    smoothed = fake_quantize(gm, assignment, calib)
    assert any(layer.a_scale is not None for layer in quant_layers(smoothed).values())
    assert all(layer.a_scale is None for layer in quant_layers(gm).values())  # the input module is untouched
    with torch.no_grad():
        ref = net(*test)
        err_plain = float((plain(*test) - ref).pow(2).mean())
        err_smooth = float((smoothed(*test) - ref).pow(2).mean())
        assert err_smooth < 0.5 * err_plain  # measured: 0.018 vs 0.053
        assert torch.equal(lower(smoothed).module(*test), smoothed(*test))


def test_smoothing_keeps_the_float_function():
    net = _Outliers().eval()
    calib = _calib(3)  # bias correction and GPTQ rounding off: they change the float function on purpose
    gm = prepare(capture(net, (calib[0][:2],)))
    fq = fake_quantize(gm, {n: 4 for n in quant_layers(gm)}, calib, bias_correction=False, rounding=False)
    for layer in quant_layers(fq).values():
        layer.set_bits(None)
    with torch.no_grad():
        torch.testing.assert_close(fq(*calib), net(*calib), rtol=1e-4, atol=1e-4)


def test_awq_scales_where_the_weights_are_the_narrower_operand():
    """At 4/8 and 2/8 the candidates are AWQ's (mean |x| based, normalised to sqrt(max * min) = 1): salient input
    channels get the largest weight scale, and the scaled model is closer to float than the plain one."""
    calib, test = _calib(4), _calib(5)
    net = _Outliers().eval()
    gm = prepare(capture(net, (calib[0][:2],)))
    for bits in ("4/8", "2/8"):
        assignment = {n: bits for n in quant_layers(gm)}
        plain = fake_quantize(gm, assignment, calib, smoothing=False)
        scaled = fake_quantize(gm, assignment, calib)
        (a_scale,) = [layer.a_scale for layer in quant_layers(scaled).values()]
        assert a_scale is not None
        s = 1 / a_scale
        assert float(s[:3].min()) > float(s[3:].max())
        torch.testing.assert_close(float(s.max() * s.min()), 1.0, rtol=1e-5, atol=0)
        with torch.no_grad():
            ref = net(*test)
            errors = [float((m(*test) - ref).pow(2).mean()) for m in (plain, scaled)]
            assert errors[1] < errors[0]
            assert torch.equal(lower(scaled).module(*test), scaled(*test))


def test_scales_are_chosen_on_live_rows_only():
    """Rows that cannot reach the output (padding) take no part in choosing the scale."""
    calib = _calib(6)
    gm = prepare(capture(_Outliers().eval(), (calib[0][:2],)))
    layers = quant_layers(gm)
    (name,) = layers
    x = calib[0].clone()
    x[1::4, 5] = 1e3  # dead rows with an outlier in a channel the live rows keep small
    live = torch.ones(x.shape[0], dtype=torch.bool)
    live[1::4] = False
    weight = layers[name].weight.detach().clone()
    expected = choose_scale(x[live] * gm.gain, weight, "4/8", True)
    assert expected is not None
    assert smooth_linears(gm, layers, {name: "4/8"}, (x,), {name: (True, True)}, {name: live}) == 1
    torch.testing.assert_close(layers[name].a_scale, 1 / expected)


def test_many_held_out_rows_screen_the_awq_candidates_on_a_quarter_then_judge_the_best_on_all(monkeypatch):
    """The held-out product was most of the AWQ search (40 candidates x rows x K x N): with >= `screen.MIN_ROWS`
    held-out rows every candidate is judged on every 4th row, and only the best `screen.KEEP` on all of them; the
    choice is the exhaustive search's on a layer with salient channels."""
    from bitmix.compiler import screen, smooth

    gen = torch.Generator().manual_seed(0)
    gain = torch.cat([torch.full((4,), 20.0), torch.rand(60, generator=gen) + 0.5])
    x = torch.randn(2 * screen.MIN_ROWS, 64, generator=gen) * gain
    w = torch.randn(48, 64, generator=gen)
    full = smooth._held_out_error
    rows: list[int] = []

    def counted(fit, test, *args):  # noqa: ANN001, ANN202
        rows.append(test.shape[0])
        return full(fit, test, *args)

    def exhaustive() -> int:
        test, target = x[1::2], x[1::2] @ w.T
        errors = [full(x[0::2], test, w, smooth.as_precision("4/8"), True, target)]
        errors += [full(x[0::2] / s, test / s, w * s, smooth.as_precision("4/8"), True, target)
                   for s in smooth._awq_scales(x[0::2], w)]
        return min(range(len(errors)), key=errors.__getitem__)

    monkeypatch.setattr(smooth, "_held_out_error", counted)
    s = choose_scale(x, w, "4/8", True)
    held_out = screen.MIN_ROWS
    assert rows.count(held_out) == screen.KEEP
    assert rows.count(held_out // screen.EVERY) == 1 + len(list(smooth._awq_scales(x[0::2], w)))
    best = exhaustive()
    assert best > 0 and s is not None
    assert torch.equal(s, list(smooth._awq_scales(x[0::2], w))[best - 1])
