"""The per-row step passes equal their torch form bit for bit (`lower._run_linear`, `_run_matmul` rely on it)."""

import numpy as np
import pytest
import torch

from bitmix.compiler.hadamard import hadamard
from bitmix.compiler.lower import row_steps_of
from bitmix.compiler.qlayer import MIN_STEP
from bitmix.kernels.row_steps import divide_rows, quantize_pass, scale_rows


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


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 17, 24, 40, 96, 384, 1536])
@pytest.mark.parametrize("has_scale, rotated", [(False, False), (True, False), (False, True), (True, True)])
def test_quantize_pass_equals_the_float32_formula_on_edge_shapes(parallel, k, has_scale, rotated):
    """The eight-lane pass with its scalar tail (K not a multiple of 8), ties, clipped and all-zero rows, pad bytes."""
    g = torch.Generator().manual_seed(k)
    m = 19
    x = torch.randn(m, k, generator=g) * torch.exp(2 * torch.randn(m, 1, generator=g))
    x[1] = 0.0
    x[3] = torch.round(x[3] * 4) / 4
    a_scale = torch.rand(k, generator=g) + 0.25
    signs = torch.where(torch.randn(k, generator=g) > 0, 1.0, -1.0)
    block = k & -k if rotated else 0
    v = hadamard(x * signs, block) if rotated else x
    v = v * a_scale if has_scale else v
    step, floor = 0.0731, MIN_STEP
    for lo, hi, shift in [(-8, 7, 0), (0, 15, 8), (-128, 127, 0), (-2, 1, 0)]:
        want_steps = torch.tensor(step, dtype=torch.float32) * v.abs().amax(-1).clamp_min(floor)
        want = torch.round((v / want_steps[:, None]).clamp(lo, hi)).to(torch.int32) - shift
        kp = (k + 3) // 4 * 4 + 4
        a8 = np.full(m * kp, 99, dtype=np.int8)
        asum = np.zeros(m, dtype=np.int64)
        steps = np.zeros(m, dtype=np.float32)
        nan = quantize_pass(parallel)(x.numpy(), a_scale.numpy(), has_scale, np.float32(step), np.float32(floor), lo,
                                      hi, shift, kp, a8, asum, steps, signs.numpy(), block)
        codes = a8.reshape(m, kp)
        assert not nan and np.array_equal(steps, want_steps.numpy())
        assert np.array_equal(codes[:, :k], want.numpy()) and not codes[:, k:].any()
        assert np.array_equal(asum, want.sum(-1).numpy())


@pytest.mark.parametrize("k", [7, 8, 16, 385])
def test_quantize_pass_flags_nan_in_the_vector_part_and_the_tail(k):
    for col in (0, k - 1):
        x = np.ones((3, k), dtype=np.float32)
        x[1, col] = np.nan
        a8 = np.zeros(3 * k, dtype=np.int8)
        flags = quantize_pass(False)(x, x[0], False, np.float32(0.1), np.float32(MIN_STEP), -8, 7, 0, k, a8,
                                     np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.float32), x[0], 0)
        assert flags
