"""The per-row step passes equal their torch form bit for bit (`lower._run_linear`, `_run_matmul` rely on it)."""

import numpy as np
import pytest
import torch

from bitmix.compiler.lower import row_steps_of
from bitmix.compiler.qlayer import MIN_STEP
from bitmix.kernels.row_steps import divide_rows, scale_rows


@pytest.mark.parametrize("shape", [(1, 64, 384), (3, 5, 17), (7, 1536), (1, 1)])
def test_divide_and_scale_rows_equal_the_torch_ops(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn((*shape[:-1], 1), generator=g))
    x[..., :1, :] = 0.0  # an all-zero row takes the floor
    step = 0.1234567
    ref_steps = row_steps_of(x, step, -1)
    scaled, steps = divide_rows(x.numpy(), step, MIN_STEP)
    assert np.array_equal(steps, ref_steps.numpy()) and np.array_equal(scaled, (x / ref_steps).numpy())
    y = torch.randn((*shape[:-1], 9), generator=g)
    bias = torch.randn(9, generator=g)
    assert np.array_equal(scale_rows(y.numpy().copy(), steps, bias.numpy()), (y * ref_steps + bias).numpy())
    assert np.array_equal(scale_rows(y.numpy().copy(), steps, None), (y * ref_steps).numpy())


def test_nan_and_inf_rows_as_torch():
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = -float("inf")
    scaled, steps = divide_rows(x.numpy(), 0.5, MIN_STEP)
    ref = row_steps_of(x, 0.5, -1)
    assert np.array_equal(steps, ref.numpy(), equal_nan=True)
    assert np.array_equal(scaled, (x / ref).numpy(), equal_nan=True)
