"""The AMX tile engine: exact on every edge of the 32x32 blocking, routed only where it pays."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmix.errors import BitmixError
from bitmix.kernels import amx, conv2d, dispatch, gemm, pack_weights, qconv2d, quantize_activations, reference
from bitmix.kernels.cpu import available_paths
from tests.kernels.conftest import random_codes

pytestmark = pytest.mark.skipif(
    "avx512amx" not in available_paths(), reason="CPU lacks AMX (or the kernel refused it)"
)


@pytest.fixture(params=["serial", "parallel"])
def amx_path(request) -> Iterator[str]:
    """The AMX path with every product of at least ``amx_min_m`` rows on the engine, however few its MACs."""
    with dispatch.use("avx512amx", serial=request.param == "serial", amx_min_macs=0):
        yield request.param


def _check(rng, m, n, k, a_bits, w_bits, a_signed, fill="random"):
    a = random_codes(rng, (m, k), a_bits, a_signed, fill)
    w = random_codes(rng, (n, k), w_bits, True, fill)
    p = pack_weights(w, w_bits)
    s = dispatch.settings
    assert s.uses_amx(p, m, 1) == (m >= s.amx_min_m and m * n * k >= s.amx_min_macs)
    np.testing.assert_array_equal(gemm(a, p, a_bits, a_signed), reference.gemm(a, w))


@pytest.mark.parametrize("m", [16, 31, 32, 33, 97])
@pytest.mark.parametrize("n", [1, 15, 17, 32, 33])
@pytest.mark.parametrize("k", [1, 63, 64, 65, 200])
def test_block_edges(amx_path, m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(m * 10_000 + n * 100 + k)
    for w_bits in (2, 4, 8):
        _check(rng, m, n, k, 8, w_bits, a_signed=False)  # shift 128: the row-sum correction path
        _check(rng, m, n, k, 4, w_bits, a_signed=True)


@pytest.mark.parametrize("fill", ["min", "max"])
@pytest.mark.parametrize("w_bits", [2, 4, 8])
def test_extremes(amx_path, fill: str, w_bits: int) -> None:
    rng = np.random.default_rng(0)
    for a_bits, a_signed in ((8, True), (8, False), (2, False)):
        _check(rng, 64, 48, 4100, a_bits, w_bits, a_signed, fill)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(16, 300), n=st.integers(1, 100), k=st.integers(1, 700),
       bits=st.sampled_from([(8, 2), (8, 4), (8, 8), (4, 4), (2, 2)]), a_signed=st.booleans(), seed=st.integers(0, 99))
def test_random_shapes(m, n, k, bits, a_signed, seed) -> None:
    with dispatch.use("avx512amx", serial=seed % 2 == 0, amx_min_macs=0):
        _check(np.random.default_rng(seed), m, n, k, bits[0], bits[1], a_signed)


def test_conv_on_amx(amx_path) -> None:
    rng = np.random.default_rng(1)
    x = random_codes(rng, (2, 8, 13, 11), 8, False)
    w = random_codes(rng, (20, 8 * 9), 4)
    p = pack_weights(w, 4)
    assert dispatch.settings.uses_amx(p, 2 * 7 * 6, 1) and not dispatch.settings.uses_amx(p, 2 * 7 * 6, 2)
    got = conv2d(x, p, (3, 3), (2, 2), (1, 1), (1, 1), 1, 8, False)
    want = reference.conv2d(x, w.reshape(20, 8, 3, 3), (2, 2), (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(got, want)


def test_weight_tiles_cached_and_exact() -> None:
    rng = np.random.default_rng(2)
    w = random_codes(rng, (40, 70), 4)
    p = pack_weights(w, 4)
    tiles = amx.weight_tiles(p)
    assert amx.weight_tiles(p) is tiles
    # tile order [n/16][k/64][k%64/4][n%16][k%4], zero-padded to 64 columns x 128 k
    t = tiles.reshape(4, 2, 16, 16, 4)
    assert t[1, 1, 0, 3, 2] == w[16 + 3, 64 + 2]
    assert t[2, 0, 5, 7, 1] == w[32 + 7, 21]
    assert not t[2, 1, 2:].any() and not t[3, :, :, 8:].any()


@pytest.mark.parametrize("m,n,tasks,rows", [(3136, 64, 8, True), (3136, 256, 8, True), (49, 512, 8, False),
                                            (256, 4096, 8, False), (40, 40, 1, True), (16, 1, 8, True)])
def test_task_grid_splits_the_larger_operand(m: int, n: int, tasks: int, rows: bool) -> None:
    m_step, n_step, rows_outer = amx.task_grid(m, n, tasks)
    mb, nb = -(-m // amx.BLOCK), -(-n // amx.BLOCK)
    assert rows_outer == rows
    assert -(-mb // m_step) * -(-nb // n_step) <= max(tasks, 2)
    assert (n_step == nb) if rows else (m_step == mb)


@pytest.mark.parametrize("a_bits,a_signed,with_bias", [(8, False, True), (4, True, False), (2, False, True)])
def test_qconv2d_fused_path_matches_formula(amx_path, a_bits: int, a_signed: bool, with_bias: bool) -> None:
    """Quantize-to-channels-last, AMX, dequantize-to-NCHW: the documented formula, bit for bit."""
    rng = np.random.default_rng(a_bits)
    x = rng.normal(0, 2, size=(2, 7, 11, 10)).astype(np.float32)
    x[0, 0, 0, :3] = [np.inf, -np.inf, 0.05]  # clipped, clipped, a rounding half
    wc = random_codes(rng, (40, 7 * 3 * 3), 4)
    w = pack_weights(wc, 4)
    scales = rng.uniform(0.01, 0.1, 40).astype(np.float32)
    bias = rng.normal(size=40).astype(np.float32) if with_bias else None
    geometry = ((3, 3), (2, 1), (1, 2), (2, 1), 1)
    y = qconv2d(x, w, scales, 0.1, a_bits, a_signed, bias, *geometry)
    codes = quantize_activations(x, 0.1, a_bits, a_signed)
    acc = reference.conv2d(codes, wc.reshape(40, 7, 3, 3), (2, 1), (1, 2), (2, 1), 1)
    want = acc.astype(np.float32) * (np.float32(0.1) * scales)[None, :, None, None]
    if with_bias:
        want = want + bias[None, :, None, None]
    assert y.flags.c_contiguous and y.dtype == np.float32
    np.testing.assert_array_equal(y, want)
    x[1, 2, 3, 4] = np.nan
    with pytest.raises(BitmixError, match="NaN"):
        qconv2d(x, w, scales, 0.1, a_bits, a_signed, bias, *geometry)


@pytest.mark.parametrize("shape,kernel,padding", [((5, 7, 3, 3), 3, 1), ((40, 8, 1, 1), 1, 0), ((3, 6, 4, 4), 3, 1),
                                                  ((2, 5, 9, 20), 1, 0)])
def test_qconv2d_fused_small_planes(amx_path, shape, kernel: int, padding: int) -> None:
    """A 32-row block spans several images when Ho*Wo < 32: each run lands in its own image."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(0, 2, size=shape).astype(np.float32)
    c = shape[1]
    wc = random_codes(rng, (37, c * kernel * kernel), 2)
    w = pack_weights(wc, 2)
    scales = rng.uniform(0.01, 0.1, 37).astype(np.float32)
    bias = rng.normal(size=37).astype(np.float32)
    geometry = ((kernel, kernel), (1, 1), (padding, padding), (1, 1), 1)
    y = qconv2d(x, w, scales, 0.2, 8, True, bias, *geometry)
    codes = quantize_activations(x, 0.2, 8, True)
    acc = reference.conv2d(codes, wc.reshape(37, c, kernel, kernel), (1, 1), (padding, padding), (1, 1), 1)
    want = acc.astype(np.float32) * (np.float32(0.2) * scales)[None, :, None, None] + bias[None, :, None, None]
    np.testing.assert_array_equal(y, want)
