"""The fused AMX linear: bit-identical to the fused vpdpbusd linear, which the AMX route replaces."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import dispatch
from bitmix.kernels.cpu import available_paths
from bitmix.kernels.linear import prepare_linear
from bitmix.kernels.linear_amx import AmxLinear
from bitmix.kernels.pack import pack_weights

pytestmark = pytest.mark.skipif("avx512amx" not in available_paths(), reason="CPU lacks AMX (or the kernel refused it)")


@pytest.mark.parametrize(("m", "k", "n"), [(16, 64, 16), (17, 100, 37), (64, 384, 384), (33, 200, 80), (70, 12, 50)])
@pytest.mark.parametrize("kind", ["plain", "smoothed", "rows", "rotated"])
@pytest.mark.parametrize("serial", [True, False])
def test_amx_linear_equals_the_vnni_linear(m: int, k: int, n: int, kind: str, serial: bool) -> None:
    rng = np.random.default_rng(m * k + n)
    w = pack_weights(rng.integers(-8, 7, (n, k), endpoint=True).astype(np.int8), 4)
    extra: dict = {}
    if kind == "smoothed":
        extra["a_scale"] = rng.uniform(0.5, 2.0, k).astype(np.float32)
    if kind in ("rows", "rotated"):
        extra["row_floor"] = 1e-6
    if kind == "rotated":
        extra["rotation"] = np.sign(rng.normal(size=k)).astype(np.float32)
    bias = None if kind == "smoothed" else rng.normal(size=n).astype(np.float32)
    signed = kind != "plain"  # unsigned 8-bit codes: the engine's shift correction
    layer = prepare_linear(w, rng.uniform(1e-3, 1e-2, n).astype(np.float32), 0.05, 8, signed, bias, **extra)
    x = (rng.normal(size=(m, k)) * 3).astype(np.float32)
    with dispatch.use("avx512vnni", serial=serial):
        want = layer(x)
    with dispatch.use("avx512amx", serial=serial, amx_min_macs=0, amx_fused_min_macs=0):
        got = layer(x)
    assert isinstance(layer._fused["amx"], AmxLinear)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_amx_linear_refuses_nan() -> None:
    rng = np.random.default_rng(0)
    layer = prepare_linear(pack_weights(rng.integers(-8, 8, (64, 64)).astype(np.int8), 4),
                           np.full(64, 0.01, np.float32), 0.05, 8, True, row_floor=1e-6)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    x[5, 7] = np.nan
    with dispatch.use("avx512amx", amx_min_macs=0, amx_fused_min_macs=0), pytest.raises(BitmixError, match="NaN"):
        layer(x)
