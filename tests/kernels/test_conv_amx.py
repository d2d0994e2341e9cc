"""Pointwise convs on the AMX tile engine: the route takes them, and every output -- floats with bias, residual
and clamp, or codes for the next conv -- equals the vpdpbusd route's bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.kernels import conv_amx, dispatch, gemm_vnni, pack_weights
from bitmix.kernels.conv_nhwc import implicit_route
from bitmix.kernels.conv_prepared import PreparedConv
from bitmix.kernels.cpu import available_paths
from bitmix.kernels.padded import PaddedCodes

pytestmark = pytest.mark.skipif("avx512amx" not in available_paths(), reason="CPU lacks AMX (or the kernel refused it)")


def _conv(rng: np.random.Generator, n: int, c: int, spec: tuple, bias: bool, k: int = 1, stride: int = 1,
          pad: int = 0, groups: int = 1) -> PreparedConv:
    w = pack_weights(rng.integers(-8, 8, (n, c // groups * k * k)).astype(np.int8), 4)
    return PreparedConv(w, rng.uniform(0.01, 0.1, n).astype(np.float32), 0.05, *spec,
                        rng.normal(size=n).astype(np.float32) if bias else None, (k, k), (stride, stride), (pad, pad),
                        (1, 1), groups)


def test_route_takes_stride_1_convs_with_whole_tile_rows() -> None:
    w = pack_weights(np.ones((64, 128), dtype=np.int8), 4)
    w3 = pack_weights(np.ones((64, 128 * 9), dtype=np.int8), 4)
    one = (1, 1, 1, 1, 0, 0, 1, 1, 1, 56, 56)
    with dispatch.use("avx512amx"):
        assert implicit_route(w, 3136, one) is conv_amx
        assert implicit_route(w3, 3136, (3, 3, 1, 1, 1, 1, 1, 1, 1, 56, 56)) is conv_amx
        assert implicit_route(w3, 784, (3, 3, 2, 2, 1, 1, 1, 1, 1, 28, 28)) is gemm_vnni  # strided
        assert implicit_route(w, 8, one) is gemm_vnni  # fewer rows than a tile
        odd = pack_weights(np.ones((64, 96), dtype=np.int8), 4)
        assert implicit_route(odd, 3136, one) is gemm_vnni  # 96 channels: not whole 64-byte rows
    with dispatch.use("avx512vnni"):
        assert implicit_route(w, 3136, one) is gemm_vnni


@pytest.mark.parametrize(("c", "n", "hw", "k", "pad", "dil"), [
    (64, 20, (9, 11), 1, 0, 1), (128, 70, (4, 8), 1, 0, 1), (64, 64, (7, 7), 1, 0, 1),  # pointwise, partial blocks
    (64, 37, (9, 11), 3, 1, 1), (128, 64, (7, 7), 3, 1, 1), (64, 16, (6, 13), 3, 0, 1),  # k x k, padded or not
    (64, 48, (10, 9), 3, 2, 2), (64, 32, (5, 6), 1, 1, 1),  # dilated; a padded 1x1 (its border rows dropped)
    (64, 24, (8, 12), (1, 3), (0, 1), 1), (128, 16, (9, 5), (5, 1), (2, 0), 1),  # 1x3 and 5x1
])
@pytest.mark.parametrize("spec", [(8, False), (4, True)], ids=["u8", "s4"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
def test_float_outputs_equal_the_vnni_route(c: int, n: int, hw: tuple, k: int | tuple, pad: int | tuple, dil: int,
                                            spec: tuple, residual: bool, serial: bool) -> None:
    (kh, kw), (ph, pw) = (k, k) if isinstance(k, int) else k, (pad, pad) if isinstance(pad, int) else pad
    rng = np.random.default_rng(c + n + kh * kw)
    w = pack_weights(rng.integers(-8, 8, (n, c * kh * kw)).astype(np.int8), 4)
    conv = PreparedConv(w, rng.uniform(0.01, 0.1, n).astype(np.float32), 0.05, *spec,
                        None if residual else rng.normal(size=n).astype(np.float32), (kh, kw), (1, 1), (ph, pw),
                        (dil, dil), 1)
    x = rng.normal(0, 2, size=(2, *hw, c)).astype(np.float32)
    ho, wo = hw[0] + 2 * ph - dil * (kh - 1), hw[1] + 2 * pw - dil * (kw - 1)
    res = rng.normal(0, 3, size=(2, ho, wo, n)).astype(np.float32) if residual else None
    clamp = (np.float32(0), np.float32(6))
    outs = []
    for path in ("avx512vnni", "avx512amx"):
        with dispatch.use(path, serial=serial, amx_min_macs=0, amx_conv_min_macs=0):
            route = implicit_route(w, 2 * ho * wo, (kh, kw, 1, 1, ph, pw, dil, dil, 1, ho, wo))
            assert route is (conv_amx if path == "avx512amx" else gemm_vnni)
            outs += [conv(x, True, res, clamp), conv(x, True, res, clamp)]  # first call, then the bound launch
    for got in outs[1:]:
        np.testing.assert_array_equal(got.view(np.int32), outs[0].view(np.int32))


@pytest.mark.parametrize("nxt", [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 64)], ids=["3x3", "1x1", "depthwise-s2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("middle", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
def test_codes_in_and_out_equal_the_vnni_route(nxt: tuple, bias: bool, middle: tuple) -> None:
    """conv (3x3, 12 -> 64) -> ``middle`` (64 -> 64, AMX) -> ``nxt``: the middle conv reads the first conv's codes
    and writes the next conv's, and the chain ends where the vpdpbusd route's does."""
    rng = np.random.default_rng(sum(nxt) + bias + middle[0])
    first = _conv(rng, 64, 12, (8, False), True, 3, 1, 1)
    point = _conv(rng, 64, 64, (4, True), bias, middle[0], 1, middle[1])
    k, stride, pad, groups = nxt
    last = _conv(rng, 64, 64, (8, False), True, k, stride, pad, groups)
    x = np.abs(rng.normal(0, 2, size=(2, 9, 11, 12))).astype(np.float32)
    relu = (np.float32(0), np.float32(np.inf))
    outs = []
    for path in ("avx512vnni", "avx512amx"):
        with dispatch.use(path, amx_min_macs=0, amx_conv_min_macs=0):
            route = implicit_route(point.w, 2 * 9 * 11, (*middle[:1] * 2, 1, 1, *middle[1:] * 2, 1, 1, 1, 9, 11))
            assert route is (conv_amx if path == "avx512amx" else gemm_vnni)
            ref = last(point(first(x, True, None, relu), True, None, relu), True)  # binds the shapes
            codes = point.to_codes(first.to_codes(x, True, relu, point), True, relu, last)
            assert isinstance(codes, PaddedCodes)
            outs += [ref, last(codes, True)]
    for got in outs[1:]:
        np.testing.assert_array_equal(got.view(np.int32), outs[0].view(np.int32))
