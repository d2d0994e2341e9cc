"""`code_matmul` equals the lowered attention matmul's torch form bit for bit (`lower._run_matmul` relies on it)."""

import numpy as np
import pytest
import torch

from bitmix.compiler.lower import row_steps_of
from bitmix.compiler.qlayer import MIN_STEP
from bitmix.kernels.code_matmul import code_matmul


def _torch_form(a: torch.Tensor, b: torch.Tensor, a_step: float, b_step: float, per_row: bool,
                a_range: tuple[int, int], b_range: tuple[int, int]) -> torch.Tensor:
    """Codes as the fake-quant layer forms them, their exact product in float64, the float32 scaling."""
    sa = row_steps_of(a, a_step, -1) if per_row else torch.tensor(a_step, dtype=torch.float32)
    sb = row_steps_of(b, b_step, -2) if per_row else torch.tensor(b_step, dtype=torch.float32)
    qa = torch.round(torch.clamp(a / sa, *a_range))
    qb = torch.round(torch.clamp(b / sb, *b_range))
    acc = torch.matmul(qa.double(), qb.double()).float()
    return acc * (sa * sb)


def _operands(g: torch.Generator, batch: tuple[int, ...], m: int, k: int, n: int, layout: str):
    """(..., M, K) and (..., K, N) operands laid out as attention's are: contiguous, heads' strided views,
    or ``b`` as a transposed view (K^T); or ``a`` as a transposed view (rows not contiguous)."""
    a = torch.randn((*batch, m, k), generator=g) * torch.exp(2 * torch.randn((*batch, m, 1), generator=g))
    b = torch.randn((*batch, k, n), generator=g) * torch.exp(2 * torch.randn((*batch, 1, n), generator=g))
    a[..., :1, :] = 0.0  # an all-zero row and column take the floor
    b[..., :, :1] = 0.0
    if layout == "transposed":
        b = b.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "a_transposed":
        a = a.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        a = a.transpose(-2, -3).contiguous().transpose(-2, -3) if a.dim() > 2 else a.t().contiguous().t()
    return a, b


@pytest.mark.parametrize(("batch", "m", "k", "n"), [((1, 12), 64, 32, 64), ((2, 3), 5, 7, 19), ((), 1, 1, 1),
                                                    ((4,), 9, 33, 16), ((1, 2), 17, 64, 33)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed", "a_transposed"])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize(("a_range", "b_range"), [((-8, 7), (-8, 7)), ((0, 15), (-2, 1)), ((-128, 127), (0, 255))])
def test_equals_the_torch_form(batch, m, k, n, layout, per_row, a_range, b_range):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n + a_range[1])
    a, b = _operands(g, batch, m, k, n, layout)
    if layout == "strided" and a.dim() > 2:
        assert not a.is_contiguous()
    got, nan = code_matmul(a.numpy(), b.numpy(), 0.3, 0.2, MIN_STEP if per_row else None, a_range, b_range)
    assert not nan
    assert got.shape == (*batch, m, n)
    assert np.array_equal(got, _torch_form(a, b, 0.3, 0.2, per_row, a_range, b_range).numpy())


def test_broadcast_batch():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, 8, generator=g), torch.randn(1, 3, 8, 5, generator=g)
    got, _ = code_matmul(a.numpy(), b.numpy(), 0.1, 0.1, MIN_STEP, (-8, 7), (-8, 7))
    ref = _torch_form(a, b.expand(2, 3, 8, 5), 0.1, 0.1, True, (-8, 7), (-8, 7))
    assert np.array_equal(got, ref.numpy())


@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_reported(where, bad):
    """NaN in either operand is reported at both step kinds; Inf only with per-row steps (its step is Inf and
    Inf / Inf a NaN code), as the torch form."""
    a, b = np.ones((1, 4, 8), dtype=np.float32), np.ones((1, 8, 3), dtype=np.float32)
    (a if where == "a" else b)[0, 2, 1] = bad
    assert code_matmul(a, b, 0.1, 0.1, MIN_STEP, (-8, 7), (-8, 7))[1]
    assert code_matmul(a, b, 0.1, 0.1, None, (-8, 7), (-8, 7))[1] == (bad != bad)


@pytest.mark.parametrize("k", [9, 16, 17])
@pytest.mark.parametrize("operand", ["a", "b", "b_transposed"])
@pytest.mark.parametrize("per_row", [True, False])
def test_nan_in_the_eight_lane_part_or_the_tail_is_reported(k, operand, per_row):
    """The code passes run eight lanes then a scalar tail, along K for ``a`` and a transposed ``b``, along N for
    ``b``: a NaN in either part is reported."""
    n = k
    for at in (0, k - 1):
        a, b = np.ones((2, 5, k), dtype=np.float32), np.ones((2, k, n), dtype=np.float32)
        if operand == "a":
            a[1, 3, at] = np.nan
        elif operand == "b":
            b[1, 2, at] = np.nan
        else:
            b = np.ascontiguousarray(b.transpose(0, 2, 1))
            b[1, 2, at] = np.nan
            b = b.transpose(0, 2, 1)
        assert code_matmul(a, b, 0.1, 0.1, MIN_STEP if per_row else None, (-8, 7), (-8, 7))[1]


@pytest.mark.parametrize(("a_shape", "b_shape"), [((0, 3, 4), (0, 4, 5)), ((2, 0, 4), (2, 4, 5)),
                                                  ((2, 3, 0), (2, 0, 5)), ((2, 3, 4), (2, 4, 0)),
                                                  ((0, 3, 4), (1, 4, 5))])
def test_empty_operands_give_torchs_shape(a_shape, b_shape):
    """Empty batches, rows, columns or K: the shape ``torch.matmul`` gives, zeros where K is empty."""
    a, b = torch.ones(a_shape), torch.ones(b_shape)
    for floor in (MIN_STEP, None):
        got, nan = code_matmul(a.numpy(), b.numpy(), 0.1, 0.1, floor, (-8, 7), (-8, 7))
        assert not nan and got.shape == torch.matmul(a, b).shape and not got.any()
