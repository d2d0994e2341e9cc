"""The fused candidate-step error equals torch's seven-pass formula (up to float summation order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitmix.kernels.range_search import step_errors


def _torch_errors(v: torch.Tensor, steps: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    q = torch.round(torch.clamp(v.unsqueeze(1).double() / steps.unsqueeze(2).double(), -q_n, q_p))
    return (q * steps.unsqueeze(2).double() - v.unsqueeze(1).double()).pow(2).sum(dim=-1)


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, True), (8, True), (4, False)])
def test_step_errors_match_torch(bits: int, signed: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(7, 300, generator=g) * torch.linspace(0.1, 3.0, 7).unsqueeze(1)
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    steps = v.abs().amax(dim=1, keepdim=True) / q_p * torch.linspace(0.05, 1.0, 13)
    got = step_errors(v.numpy(), steps.numpy(), q_n, q_p)
    assert got.shape == (7, 13) and got.dtype == np.float64
    np.testing.assert_allclose(got, _torch_errors(v, steps, q_n, q_p).numpy(), rtol=1e-5)


def test_values_on_the_rounding_grid_have_no_error_and_clipping_counts() -> None:
    v = np.array([[0.0, 0.5, -1.0, 1.5, 3.0]], dtype=np.float32)
    steps = np.array([[0.5, 1.0]], dtype=np.float32)
    got = step_errors(v, steps, 2, 1)  # codes -2..1: step 0.5 clips at 0.5, step 1 rounds 0.5 and 1.5 to even
    assert got[0, 0] == pytest.approx(1.0**2 + 2.5**2)
    assert got[0, 1] == pytest.approx(0.5**2 + 0.5**2 + 2.0**2)
