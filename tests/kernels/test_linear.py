"""``prepare_linear``: bit-exact against the integer reference on every path (the fused VNNI kernel on
``avx512vnni``), with and without bias and smoothing factor; bad inputs rejected in one line."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import pack_weights, prepare_linear, quantize_activations, reference
from bitmix.kernels.pack import code_range


def _expected(x, w_codes, scales, step, a_bits, a_signed, bias, a_scale):
    """The documented formula on the integer reference: codes of ``x * a_scale``, exact int64 product."""
    xs = x if a_scale is None else x * a_scale
    codes = quantize_activations(xs.reshape(-1, x.shape[-1]), step, a_bits, a_signed)
    acc = reference.gemm(codes.astype(np.int64), w_codes.astype(np.int64))
    y = acc.astype(np.float32) * (np.float32(step) * scales)[None, :]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("w_bits", "a_bits", "a_signed"), [(4, 4, True), (4, 8, False), (2, 4, False),
                                                             (2, 8, True), (8, 8, False), (8, 4, True)])
@pytest.mark.parametrize("m", [1, 3, 64, 257, 400])  # 400 x 100: a quantize pass over threads (SERIAL_QUANTIZE_MAX)
def test_linear_kernel_exact(kernel_path, w_bits, a_bits, a_signed, m) -> None:
    rng = np.random.default_rng(w_bits * 1000 + a_bits * 10 + m)
    k, n = 100, 37  # K not a multiple of 64, N not a multiple of 16
    lo, hi = code_range(w_bits, True)
    w_codes = rng.integers(lo, hi, (n, k), endpoint=True).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    a_scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
    step = 0.07 if a_bits == 8 else 0.4
    x = (rng.normal(size=(m, k)) * 3).astype(np.float32)
    if not a_signed:
        x = np.abs(x)
    w = pack_weights(w_codes, w_bits)
    for b, s in ((bias, a_scale), (None, None), (bias, None), (None, a_scale)):
        got = prepare_linear(w, scales, step, a_bits, a_signed, b, s)(x)
        np.testing.assert_array_equal(got, _expected(x, w_codes, scales, step, a_bits, a_signed, b, s))


@pytest.mark.parametrize(("w_bits", "a_bits", "a_signed"),
                         [(4, 4, True), (2, 4, False), (8, 4, True), (4, 8, True), (2, 8, False)])
@pytest.mark.parametrize("m", [1, 3, 4, 17, 64])
def test_linear_kernel_with_row_steps_exact(kernel_path, w_bits, a_bits, a_signed, m) -> None:
    """Per-row steps (``row_floor``): row i quantized at ``step * max(max|x[i] * a_scale|, floor)``, its
    output row scaled by that step after the exact product, then the bias (the fake-quant formula)."""
    rng = np.random.default_rng(w_bits * 100 + a_bits * 10 + m)
    k, n, step, floor = 100, 37, 0.125 if a_bits == 4 else 1 / 120, 1e-8
    lo, hi = code_range(w_bits, True)
    w_codes = rng.integers(lo, hi, (n, k), endpoint=True).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    x = (rng.normal(size=(m, k)) * np.exp(3 * rng.normal(size=(m, 1)))).astype(np.float32)
    x[0] = 0.0  # an all-zero row takes the floor
    if not a_signed:
        x = np.abs(x)
    w = pack_weights(w_codes, w_bits)
    for bias, a_scale in ((rng.normal(size=n).astype(np.float32), rng.uniform(0.5, 2.0, k).astype(np.float32)),
                          (None, None)):
        xs = x if a_scale is None else x * a_scale
        rows = np.float32(step) * np.maximum(np.abs(xs).max(axis=1, keepdims=True), np.float32(floor))
        codes = quantize_activations(xs / rows, 1.0, a_bits, a_signed)
        want = reference.gemm(codes.astype(np.int64), w_codes.astype(np.int64)).astype(np.float32) * scales * rows
        if bias is not None:
            want = want + bias
        got = prepare_linear(w, scales, step, a_bits, a_signed, bias, a_scale, row_floor=floor)(x)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(BitmixError, match="NaN"):
        x[-1, 5] = np.nan
        prepare_linear(w, scales, step, a_bits, a_signed, row_floor=floor)(x)


@pytest.mark.parametrize(("k", "row_floor"), [(96, 1e-8), (100, 1e-8), (1536, 1e-8), (96, None), (12, 1e-8)])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_linear_kernel_with_rotation_equals_rotating_first(kernel_path, k, row_floor, m) -> None:
    """``rotation``: the same as ``hadamard.rotate_rows`` on the input and the kernel without it, bit for bit
    (inside the fused per-row quantize pass, or before the other paths), with and without smoothing."""
    from bitmix.kernels.hadamard import rotate_rows

    rng = np.random.default_rng(k + m)
    n = 37
    w = pack_weights(rng.integers(-8, 7, (n, k), endpoint=True).astype(np.int8), 4)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), k)
    x = (rng.normal(size=(2, m, k)) * np.exp(2 * rng.normal(size=(2, m, 1)))).astype(np.float32)
    for a_scale in (None, rng.uniform(0.5, 2.0, k).astype(np.float32)):
        got = prepare_linear(w, scales, 0.125, 4, True, bias, a_scale, row_floor, rotation=signs)(x)
        plain = prepare_linear(w, scales, 0.125, 4, True, bias, a_scale, row_floor)
        np.testing.assert_array_equal(got, plain(rotate_rows(x, signs, k & -k)))
    with pytest.raises(BitmixError, match="rotation"):
        prepare_linear(w, scales, 0.125, 4, True, rotation=signs[:-1])


def test_linear_kernel_keeps_leading_dims_and_reads_strided_input(kernel_path) -> None:
    rng = np.random.default_rng(3)
    w_codes = rng.integers(-8, 7, (20, 64), endpoint=True).astype(np.int8)
    scales = np.full(20, 0.05, dtype=np.float32)
    x = rng.normal(size=(2, 5, 128)).astype(np.float32)[..., ::2]  # not C-contiguous
    got = prepare_linear(pack_weights(w_codes, 4), scales, 0.2, 4, True)(x)
    assert got.shape == (2, 5, 20)
    np.testing.assert_array_equal(got, _expected(x, w_codes, scales, 0.2, 4, True, None, None))


@pytest.mark.parametrize("row_floor", [None, 1e-8])
@pytest.mark.parametrize("m", [1, 3, 17, 64, 400])
def test_residual_add_equals_adding_after(kernel_path, row_floor, m) -> None:
    """``kernel(x, r)`` (the AVX2 GEMM's epilogue, else an add after the kernel) == ``kernel(x) + r`` bit for bit,
    NaN, infinities and -0.0 in ``r`` included; ``r`` read through strides where it has them."""
    rng = np.random.default_rng(m)
    k, n = 100, 37
    w = pack_weights(rng.integers(-8, 7, (n, k), endpoint=True).astype(np.int8), 4)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=(m, k)).astype(np.float32)
    r = (rng.normal(size=(n, m)) * 10).astype(np.float32).T  # not C-contiguous
    r[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    kernel = prepare_linear(w, scales, 0.3, 4, True, bias, row_floor=row_floor)
    np.testing.assert_array_equal(kernel(x, r), kernel(x) + r)
    y = kernel(x[None], r[None])
    assert y.shape == (1, m, n)
    np.testing.assert_array_equal(y[0], kernel(x) + r)


def test_residual_of_the_wrong_shape_or_type_is_refused() -> None:
    w = pack_weights(np.zeros((4, 8), dtype=np.int8), 4)
    kernel = prepare_linear(w, np.ones(4, dtype=np.float32), 0.1, 8, True)
    x = np.ones((5, 8), dtype=np.float32)
    with pytest.raises(BitmixError, match=r"residual: expected a float32 numpy array \(5, 4\)"):
        kernel(x, np.ones((5, 5), dtype=np.float32))
    with pytest.raises(BitmixError, match="residual: expected a float32"):
        kernel(x, np.ones((5, 4), dtype=np.float64))


def test_linear_kernel_takes_an_empty_batch() -> None:
    w = pack_weights(np.zeros((4, 8), dtype=np.int8), 4)
    ones = np.ones(4, dtype=np.float32)
    for row_floor in (None, 1e-8):
        kernel = prepare_linear(w, ones, 0.1, 4, True, ones, row_floor=row_floor)
        assert kernel(np.zeros((0, 8), dtype=np.float32)).shape == (0, 4)
        assert kernel(np.zeros((2, 0, 8), dtype=np.float32)).shape == (2, 0, 4)


@pytest.mark.parametrize("m", [1, 5, 64])
def test_a_finite_row_whose_step_overflows_is_refused(kernel_path, m) -> None:
    """A finite row whose per-row step overflows float32 (4 * 3e38) quantizes to zeros times an infinite step:
    the fused M >= 4 kernels answered NaN without a word, as the GEMV and portable paths refuse it."""
    w = pack_weights(np.ones((8, 16), dtype=np.int8), 4)
    x = np.ones((m, 16), dtype=np.float32)
    x[-1, 0] = 3e38
    kernel = prepare_linear(w, np.ones(8, dtype=np.float32), 4.0, 8, True, row_floor=1e-8)
    with pytest.raises(BitmixError, match="NaN or Inf"):
        kernel(x)


def test_linear_kernel_rejects_bad_inputs() -> None:
    w = pack_weights(np.zeros((4, 8), dtype=np.int8), 4)
    ones = np.ones(4, dtype=np.float32)
    kernel = prepare_linear(w, ones, 0.1, 8, True)
    with pytest.raises(BitmixError, match="x: expected a float32"):
        kernel(np.ones((5, 8), dtype=np.float64))
    with pytest.raises(BitmixError, match="x: expected a float32"):
        kernel(np.ones((5, 9), dtype=np.float32))
    with pytest.raises(BitmixError, match="NaN"):
        kernel(np.full((5, 8), np.nan, dtype=np.float32))
    with pytest.raises(BitmixError, match="a_scale"):
        prepare_linear(w, ones, 0.1, 8, True, a_scale=np.ones(7, dtype=np.float32))
    with pytest.raises(BitmixError, match="a_step"):
        prepare_linear(w, ones, -1.0, 8, True)
    with pytest.raises(BitmixError, match="a_bits"):
        prepare_linear(w, ones, 0.1, 3, True)
