"""GEMM/GEMV kernels are bit-exact against the int64 reference on every runnable path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitmix.errors import BitmixError
from bitmix.kernels import gemm, pack_weights, reference
from bitmix.kernels.pack import code_range

from .conftest import random_codes

PAIRS = [(a, w) for a in (8, 4, 2) for w in (8, 4, 2)]
ODD = [1, 3, 7, 33]
dims_m = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 33, 65]), st.integers(1, 80))
dims_n = st.one_of(st.sampled_from(ODD), st.integers(1, 40))
dims_k = st.one_of(st.sampled_from([*ODD, 64, 127, 128, 129, 4097]), st.integers(1, 300))
fills = st.sampled_from(["random", "random", "random", "min", "max"])


def _check(m, n, k, w_bits, a_bits, a_signed, a_fill, w_fill, seed, a_dtype=np.int16) -> None:
    rng = np.random.default_rng(seed)
    w = random_codes(rng, (n, k), w_bits, True, w_fill).astype(np.int8)
    a = random_codes(rng, (m, k), a_bits, a_signed, a_fill).astype(a_dtype)
    out = gemm(a, pack_weights(w, w_bits), a_bits, a_signed)
    assert out.dtype == np.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(out, reference.gemm(a, w))


def _case(draw_pair: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(dims_m, dims_n, dims_k, draw_pair, st.booleans(), fills, fills, st.integers(0, 2**32 - 1))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_case(st.sampled_from(PAIRS)))
def test_gemm_bit_exact(kernel_path: str, case) -> None:
    m, n, k, (a_bits, w_bits), a_signed, a_fill, w_fill, seed = case
    _check(m, n, k, w_bits, a_bits, a_signed, a_fill, w_fill, seed)


@pytest.mark.parametrize(("a_bits", "w_bits"), PAIRS)
@pytest.mark.parametrize("a_signed", [True, False])
def test_gemm_extremes(kernel_path: str, a_bits: int, w_bits: int, a_signed: bool) -> None:
    """All-min/all-max operands at a long K: catches saturation and offset mistakes."""
    for a_fill in ("min", "max"):
        for w_fill in ("min", "max"):
            _check(5, 3, 4097, w_bits, a_bits, a_signed, a_fill, w_fill, 0)
            _check(1, 7, 4097, w_bits, a_bits, a_signed, a_fill, w_fill, 0)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint16])
def test_any_integer_dtype(kernel_path: str, dtype) -> None:
    signed = np.issubdtype(dtype, np.signedinteger)
    _check(9, 5, 130, 4, 4, signed, "random", "random", 1, a_dtype=dtype)


def test_gemv_large(kernel_path: str) -> None:
    _check(1, 257, 4097, 4, 8, True, "random", "random", 2)
    _check(2, 33, 4096, 2, 8, False, "random", "random", 3)


@pytest.mark.slow
@pytest.mark.parametrize(("a_bits", "w_bits"), PAIRS)
def test_gemm_bit_exact_many(kernel_path: str, a_bits: int, w_bits: int) -> None:
    """>= 10^4 Hypothesis cases per (a_bits, w_bits) pair and path."""

    @settings(max_examples=10_000, deadline=None, database=None)
    @given(case=_case(st.just((a_bits, w_bits))))
    def run(case) -> None:
        m, n, k, _, a_signed, a_fill, w_fill, seed = case
        _check(m, n, k, w_bits, a_bits, a_signed, a_fill, w_fill, seed)

    run()


def test_bad_activation_codes() -> None:
    w = pack_weights(np.zeros((3, 10), np.int8), 4)
    lo, hi = code_range(4)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.full((2, 10), hi + 1), w, 4, True)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.full((2, 10), -1), w, 8, False)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.full((2, 10), 2**63, dtype=np.uint64), w, 8, False)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.zeros((2, 11), np.int8), w, 8, True)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.zeros((2, 10), np.float32), w, 8, True)
    with pytest.raises(BitmixError, match="a_codes"):
        gemm(np.zeros(10, np.int8), w, 8, True)
    with pytest.raises(BitmixError, match="a_bits"):
        gemm(np.zeros((2, 10), np.int8), w, 3, True)
    with pytest.raises(BitmixError, match="a_signed"):
        gemm(np.zeros((2, 10), np.int8), w, 8, "yes")
    with pytest.raises(BitmixError, match="w"):
        gemm(np.zeros((2, 10), np.int8), np.zeros((3, 10), np.int8), 8, True)
    assert issubclass(BitmixError, ValueError)


def test_unsigned_8bit_full_range(kernel_path: str) -> None:
    _check(4, 5, 300, 8, 8, False, "max", "min", 0)
    _check(4, 5, 300, 8, 8, False, "random", "random", 4)
