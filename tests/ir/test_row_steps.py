"""The per-row activation-step rule: linears and matmuls at 4-bit activations or at 8 beside narrower weights,
never convs."""

from bitmix.ir.precision import Precision
from bitmix.ir.row_steps import row_steps


def test_linears_and_matmuls_at_4_bit_activations_step_per_row():
    for kind in ("linear", "matmul"):
        assert all(row_steps(kind, Precision(w, 4)) for w in (4, 2))


def test_8_bit_activations_step_per_row_only_beside_narrower_weights():
    for kind in ("linear", "matmul"):
        assert row_steps(kind, Precision(4, 8)) and row_steps(kind, Precision(2, 8))
    assert not row_steps("linear", Precision(8, 8))


def test_8_8_and_2_bit_activations_and_convs_keep_one_step_per_tensor():
    assert not row_steps("linear", Precision(2, 2))
    assert not row_steps("matmul", Precision(2, 2))
    assert not row_steps("matmul", Precision(8, 8))
    assert not row_steps("conv2d", Precision(4, 4))
    assert not row_steps("conv2d", Precision(4, 8))
    assert not row_steps("conv2d", Precision(2, 2))
