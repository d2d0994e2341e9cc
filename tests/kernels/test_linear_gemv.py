"""``linear_gemv``: a lowered linear of fewer than four rows is one compiled call, bit-identical to the unfused
passes it replaced (``quant.qlinear``, ``row_steps.divide_rows``/``scale_rows``, ``hadamard.rotate_rows``) and to
the integer reference, on every path; NaN/Inf rows refused as before."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import linear, pack_weights, prepare_linear, qlinear, quantize_activations, reference
from bitmix.kernels.hadamard import rotate_rows
from bitmix.kernels.pack import code_range
from bitmix.kernels.row_steps import divide_rows, scale_rows

K, N = 301, 70  # K odd (not a multiple of 64), N not a multiple of 4 and more than two 32-row tiles


def _layer(rng, w_bits, k=K, n=N):
    lo, hi = code_range(w_bits, True)
    w_codes = rng.integers(lo, hi, (n, k), endpoint=True).astype(np.int8)
    return (w_codes, pack_weights(w_codes, w_bits), rng.uniform(0.01, 0.1, n).astype(np.float32),
            rng.normal(size=n).astype(np.float32), rng.uniform(0.5, 2.0, k).astype(np.float32))


@pytest.mark.parametrize(("w_bits", "a_bits", "a_signed"), [(2, 8, True), (2, 4, False), (4, 4, True),
                                                             (4, 8, False), (8, 8, False), (8, 4, True),
                                                             (8, 8, True)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_linear_equals_qlinear_and_the_integer_reference(kernel_path, w_bits, a_bits, a_signed, m) -> None:
    rng = np.random.default_rng(w_bits * 100 + a_bits * 10 + m)
    w_codes, w, scales, bias, a_scale = _layer(rng, w_bits)
    step = 0.07 if a_bits == 8 else 0.4
    x = (rng.normal(size=(m, K)) * 3).astype(np.float32)
    x[0, :3] = (1e30, -np.inf, np.inf)  # clipped to the code range, as qlinear does
    for b, s in ((bias, a_scale), (None, None), (bias, None), (None, a_scale)):
        xs = x if s is None else x * s
        got = prepare_linear(w, scales, step, a_bits, a_signed, b, s)(x)
        np.testing.assert_array_equal(got, qlinear(xs, w, scales, step, a_bits, a_signed, b))
        codes = quantize_activations(xs, step, a_bits, a_signed)
        want = reference.gemm(codes.astype(np.int64), w_codes.astype(np.int64)).astype(np.float32)
        want = want * (np.float32(step) * scales)
        np.testing.assert_array_equal(got, want if b is None else want + b)


@pytest.mark.parametrize(("w_bits", "a_bits", "a_signed", "k"), [(4, 4, True, 384), (8, 8, True, 96),
                                                                  (2, 4, False, K), (4, 8, False, 12)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_linear_with_row_steps_and_rotation_equals_the_unfused_passes(kernel_path, w_bits, a_bits, a_signed, k,
                                                                           m) -> None:
    """``rotate_rows``, times ``a_scale``, ``divide_rows``, ``qlinear`` at step 1 and ``scale_rows``: the path
    every GEMV-shaped per-row-step layer took, bit for bit, and the rotation alone before ``qlinear``."""
    rng = np.random.default_rng(k + m + w_bits)
    _, w, scales, bias, a_scale = _layer(rng, w_bits, k)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), k)
    step, floor = (0.125 if a_bits == 4 else 1 / 120), 1e-8
    x = (rng.normal(size=(m, k)) * np.exp(3 * rng.normal(size=(m, 1)))).astype(np.float32)
    x[-1] = 0.0  # an all-zero row takes the floor
    for b, s, rotation in ((bias, a_scale, signs), (None, None, signs), (bias, a_scale, None), (None, None, None)):
        xr = x if rotation is None else rotate_rows(x, rotation, k & -k)
        xs = xr if s is None else xr * s
        rows, steps = divide_rows(xs, step, floor)
        want = scale_rows(qlinear(rows, w, scales, 1.0, a_bits, a_signed, None), steps, b)
        got = prepare_linear(w, scales, step, a_bits, a_signed, b, s, row_floor=floor, rotation=rotation)(x)
        np.testing.assert_array_equal(got, want)
        if rotation is not None:
            got = prepare_linear(w, scales, step, a_bits, a_signed, b, s, rotation=rotation)(x)
            np.testing.assert_array_equal(got, qlinear(xs, w, scales, step, a_bits, a_signed, b))


def test_gemv_linear_is_one_compiled_call(kernel_path, monkeypatch) -> None:
    """No ``qlinear`` (quantize, GEMM and dequantize passes with Python between them) for M < 4; leading
    dimensions kept, strided and read-only input read."""
    def unfused(*args: object) -> None:
        raise AssertionError("a GEMV-shaped linear ran the unfused passes")

    monkeypatch.setattr(linear, "qlinear", unfused)
    rng = np.random.default_rng(7)
    w_codes, w, scales, bias, a_scale = _layer(rng, 4, 64, 20)
    x = rng.normal(size=(1, 3, 128)).astype(np.float32)[..., ::2]
    for row_floor in (None, 1e-8):
        got = prepare_linear(w, scales, 0.2, 4, True, bias, a_scale, row_floor)(x)
        assert got.shape == (1, 3, 20)
    frozen = np.ascontiguousarray(x[0, :2])
    frozen.flags.writeable = False
    got = prepare_linear(w, scales, 0.2, 4, True, bias, rotation=np.ones(64, dtype=np.float32))(frozen)
    want = _expected_plain(rotate_rows(frozen, np.ones(64, dtype=np.float32), 64), w_codes, scales, 0.2, bias)
    np.testing.assert_array_equal(got, want)


def _expected_plain(x, w_codes, scales, step, bias):
    codes = quantize_activations(x, step, 4, True)
    acc = reference.gemm(codes.astype(np.int64), w_codes.astype(np.int64)).astype(np.float32)
    return acc * (np.float32(step) * scales) + bias


@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_linear_refuses_nan_and_inf_rows(kernel_path, m) -> None:
    rng = np.random.default_rng(m)
    _, w, scales, bias, a_scale = _layer(rng, 4)
    x = rng.normal(size=(m, K)).astype(np.float32)
    plain = prepare_linear(w, scales, 0.1, 8, True, bias, a_scale)
    rows = prepare_linear(w, scales, 0.1, 8, True, bias, a_scale, row_floor=1e-8, rotation=np.ones(K, np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1, K // 2] = bad
        if bad != bad:
            with pytest.raises(BitmixError, match="^x: contains NaN; cannot quantize$"):
                plain(y)
        with pytest.raises(BitmixError, match=r"^x: contains NaN or Inf \(a row's step from its max\)"):
            rows(y)
    huge = x.copy()
    huge[-1, 0] = 3e38  # finite, but its row's step (4 * 3e38) overflows to inf
    with pytest.raises(BitmixError, match="NaN or Inf"):
        prepare_linear(w, scales, 4.0, 8, True, row_floor=1e-8)(huge)
