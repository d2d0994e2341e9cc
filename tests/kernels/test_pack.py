from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmix.errors import BitmixError
from bitmix.kernels.pack import PackedWeight, code_range, pack_weights, unpack_weights


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 9), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_round_trip(bits: int, n: int, k: int, seed: int) -> None:
    lo, hi = code_range(bits)
    codes = np.random.default_rng(seed).integers(lo, hi, (n, k), endpoint=True).astype(np.int8)
    p = pack_weights(codes, bits)
    assert isinstance(p, PackedWeight) and (p.n, p.k, p.bits) == (n, k, bits)
    assert p.data.dtype == np.uint8 and p.data.shape == (n, p.k_pad * bits // 8)
    assert np.array_equal(unpack_weights(p), codes)
    assert np.array_equal(p.row_sums, codes.astype(np.int64).sum(1))


def test_int4_layout_is_planar_nibbles() -> None:
    codes = np.arange(64).reshape(1, 64) % 16 - 8
    p = pack_weights(codes.astype(np.int8), 4)
    u = codes[0] + 8
    assert p.k_pad == 64 and p.offset == 8
    assert np.array_equal(p.data[0], (u[:32] | (u[32:] << 4)).astype(np.uint8))


def test_int2_layout_and_padding() -> None:
    codes = np.array([[-2, -1, 0, 1, 1]], dtype=np.int8)
    p = pack_weights(codes, 2)
    assert p.k_pad == 128 and p.data.shape == (1, 32)
    assert p.data[0, 0] == (0 | (2 << 2) | (2 << 4) | (2 << 6))  # code -2 at j=0, pad (code 0) in planes 1-3
    assert p.data[0, 5] == 0b10101010  # pure padding: code 0 = stored 2 in every plane


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_extreme_codes(bits: int) -> None:
    lo, hi = code_range(bits)
    codes = np.array([[lo] * 70, [hi] * 70], dtype=np.int8)
    assert np.array_equal(unpack_weights(pack_weights(codes, bits)), codes)


@pytest.mark.parametrize(
    ("codes", "bits", "match"),
    [
        (np.zeros((2, 3), np.int8), 3, "bits"),
        (np.zeros((2, 3), np.float32), 4, "codes"),
        (np.zeros(3, np.int8), 4, "codes"),
        (np.full((2, 3), 8, np.int8), 4, "codes"),
        (np.full((2, 3), -3, np.int8), 2, "codes"),
        (np.zeros((0, 3), np.int8), 4, "codes"),
    ],
)
def test_bad_input(codes: np.ndarray, bits: int, match: str) -> None:
    with pytest.raises(BitmixError, match=match):
        pack_weights(codes, bits)
