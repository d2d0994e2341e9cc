"""Activation x activation batched matmul: exact against int64 numpy for any signedness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmix.errors import BitmixError
from bitmix.kernels import bmm
from tests.kernels.conftest import random_codes


@settings(max_examples=80, deadline=None)
@given(nb=st.integers(1, 4), m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 40),
       bits=st.sampled_from([2, 4, 8]), a_signed=st.booleans(), b_signed=st.booleans(), seed=st.integers(0, 9))
def test_exact(nb, m, k, n, bits, a_signed, b_signed, seed) -> None:
    rng = np.random.default_rng(seed)
    a = random_codes(rng, (nb, m, k), bits, a_signed)
    b = random_codes(rng, (nb, k, n), bits, b_signed)
    np.testing.assert_array_equal(bmm(a, b), a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("fill", ["min", "max"])
def test_extremes_at_large_k(fill: str) -> None:
    rng = np.random.default_rng(0)
    a = random_codes(rng, (2, 3, 4000), 8, False, fill).astype(np.uint8)
    b = random_codes(rng, (2, 4000, 5), 8, True, fill).astype(np.int8)
    np.testing.assert_array_equal(bmm(a, b), a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize(
    "a,b,message",
    [
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 4, 5), np.int8), "a_codes: expected a 3-D integer"),
        (np.zeros((3, 4), np.int8), np.zeros((2, 4, 5), np.int8), "a_codes: expected a 3-D integer"),
        (np.zeros((2, 3, 4), np.int8), np.zeros((2, 5, 5), np.int8), "need (B, M, K) and (B, K, N)"),
        (np.zeros((2, 3, 4), np.int8), np.full((2, 4, 5), 300, np.int16), "b_codes: codes must lie"),
    ],
)
def test_bad_input(a, b, message) -> None:
    with pytest.raises(BitmixError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bmm(a, b)
