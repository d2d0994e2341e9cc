"""MSE range search against brute force in plain torch, and calibration input checks."""

from __future__ import annotations

import pytest
import torch

from bitmix.compiler import ranges
from bitmix.compiler.qlayer import qrange
from bitmix.errors import BitmixError


def _mse(v: torch.Tensor, step: float, q_n: int, q_p: int) -> float:
    return float(((torch.round(torch.clamp(v / step, -q_n, q_p)) * step - v) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_step_is_the_brute_force_minimum_on_a_gaussian(bits):
    v = torch.randn(1, 20_000, generator=torch.Generator().manual_seed(bits))
    q_n, q_p = qrange(bits, True)
    step = float(ranges.mse_steps(v, q_n, q_p)[0])
    top = float(v.abs().max()) / q_p
    brute = min(_mse(v, top * k / 1000, q_n, q_p) for k in range(5, 1001, 2))
    assert _mse(v, step, q_n, q_p) <= brute * 1.01
    assert _mse(v, step, q_n, q_p) < _mse(v, top, q_n, q_p)  # better than min-max (clipping pays at low bits)


def test_low_bits_clip_more_than_high_bits():
    """The known optimum for a unit Gaussian: clip near 1.7 sigma at 2 bits, near max at 8 bits."""
    v = torch.randn(1, 50_000, generator=torch.Generator().manual_seed(0))
    s2 = float(ranges.mse_steps(v, *qrange(2, True))[0])
    s8 = float(ranges.mse_steps(v, *qrange(8, True))[0])
    assert 0.8 < s2 < 1.2  # 2-bit signed: codes {-2,-1,0,1}; MSE-optimal step ~ 0.996 sigma
    assert s8 * 127 > 3.0  # 8 bits keeps (almost) the whole range


def test_weight_steps_are_per_channel():
    scale = torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    w = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * scale
    steps = ranges.weight_steps(w, *qrange(4, True))
    assert steps.shape == (3,)
    for i in range(3):  # each channel's step is its own row's optimum
        assert torch.equal(steps[i], ranges.mse_steps(w[i].reshape(1, -1), *qrange(4, True))[0])


def test_activation_sign_choice():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=gen)
    gelu = torch.nn.functional.gelu(x * 2 + 5)  # ~0.1 % small negatives
    assert ranges.activation_range(x, 8, True)[0] is True  # symmetric: clipping half would be ruinous
    assert ranges.activation_range(gelu, 8, True)[0] is False  # few small negatives: unsigned wins
    assert ranges.activation_range(gelu.abs(), 8, False)[0] is False  # unsigned stays unsigned


def test_search_is_deterministic_on_large_tensors():
    v = torch.randn(ranges.MAX_SAMPLES + 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ranges.activation_range(v, 4, True)[1], ranges.activation_range(v, 4, True)[1])


def test_bad_calibration_inputs_are_one_line_errors():
    with pytest.raises(BitmixError, match="NaN or Inf"):
        ranges.check_calibration((torch.tensor([[1.0, float("nan")]]),))
    with pytest.raises(BitmixError, match="no examples"):
        ranges.check_calibration((torch.zeros(0, 3),))
    with pytest.raises(BitmixError, match="tuple of tensors"):
        ranges.check_calibration(torch.zeros(2, 3))
