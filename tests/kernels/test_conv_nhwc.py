"""Channels-last conv route: NHWC (or NCHW) floats in, NHWC floats out, bit-identical to ``qconv2d``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitmix.errors import BitmixError
from bitmix.kernels import pack_weights, qconv2d, qconv2d_nhwc
from bitmix.kernels.pack import code_range

CASES = [  # (c_in, c_out, k, stride, pad, dil, groups, w_bits, a_bits, a_signed)
    (70, 12, 1, 1, 0, 1, 1, 4, 8, False),  # 1x1: quantized straight into GEMM rows
    (64, 20, 1, 1, 0, 1, 1, 2, 4, True),
    (16, 12, 1, 2, 0, 1, 1, 8, 8, True),  # strided 1x1: patches
    (5, 12, 3, 1, 1, 1, 1, 4, 8, False),  # k x k: channels-last patches
    (33, 12, 3, 2, 1, 2, 1, 2, 4, True),
    (3, 12, 7, 2, 3, 1, 1, 8, 8, False),
    (6, 70, 3, 1, 1, 1, 1, 4, 4, False),  # implicit GEMM: full 64-channel tiles plus a partial block
    (21, 130, 3, 2, 0, 1, 1, 8, 8, True),
    (64, 64, 1, 2, 0, 1, 1, 2, 8, False),
    (10, 66, 2, 1, 1, 3, 1, 4, 8, True),
    (24, 24, 3, 1, 1, 1, 24, 4, 8, False),  # depthwise: direct loop over channels
    (40, 40, 3, 2, 1, 1, 40, 8, 8, True),
    (8, 8, 5, 1, 2, 2, 8, 2, 4, False),
    (8, 16, 3, 1, 1, 1, 8, 4, 8, True),  # channel multiplier: the NCHW route, transposed
    (8, 12, 3, 1, 1, 1, 2, 4, 8, False),  # grouped
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_nhwc_route_equals_qconv2d(kernel_path: str, case: tuple, channels_last: bool) -> None:
    c, n, k, stride, pad, dil, groups, w_bits, a_bits, a_signed = case
    rng = np.random.default_rng(c * k + n)
    x = rng.normal(0, 2, size=(2, c, 9, 11)).astype(np.float32)
    lo, hi = code_range(w_bits)
    wc = rng.integers(lo, hi, (n, c // groups, k, k), endpoint=True).astype(np.int8)
    w = pack_weights(wc.reshape(n, -1), w_bits)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if k != 5 else None
    geometry = ((k, k), (stride, stride), (pad, pad), (dil, dil), groups)
    want = qconv2d(x, w, scales, 0.05, a_bits, a_signed, bias, *geometry)
    fed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x
    got = qconv2d_nhwc(fed, w, scales, 0.05, a_bits, a_signed, bias, *geometry, channels_last=channels_last)
    assert got.shape == (want.shape[0], *want.shape[2:], want.shape[1]) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
    # and the integer part against torch on the codes
    codes = torch.round(torch.clamp(torch.from_numpy(x) / np.float32(0.05), *code_range(a_bits, a_signed)))
    acc = F.conv2d(codes.double(), torch.from_numpy(wc).double(), None, stride, pad, dil, groups).float()
    ref = acc * torch.from_numpy(np.float32(0.05) * scales)[None, :, None, None]
    if bias is not None:
        ref = ref + torch.from_numpy(bias)[None, :, None, None]
    np.testing.assert_array_equal(got, ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 4)])
def test_nhwc_route_rejects_nan_and_bad_shapes(k: int, groups: int) -> None:
    w = pack_weights(np.ones((4, 4 // groups * k * k), np.int8), 8)
    s = np.ones(4, np.float32)
    x = np.zeros((1, 5, 5, 4), np.float32)
    x[0, 2, 2, 1] = np.nan
    with pytest.raises(BitmixError, match="NaN"):
        qconv2d_nhwc(x, w, s, 0.1, 8, True, None, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups)
    with pytest.raises(BitmixError, match="x"):
        qconv2d_nhwc(np.zeros((5, 5, 4), np.float32), w, s, 0.1, 8, True, None, (k, k))
    with pytest.raises(BitmixError, match="K="):
        qconv2d_nhwc(np.zeros((1, 5, 5, 3), np.float32), w, s, 0.1, 8, True, None, (k, k), groups=1)


@pytest.mark.parametrize("k,w_bits,a_signed", [(3, 4, False), (5, 4, False), (3, 8, True), (3, 2, False)])
def test_depthwise_extreme_codes_do_not_overflow(k: int, w_bits: int, a_signed: bool) -> None:
    """Depthwise sums accumulate in int16 only when they fit (3x3 int4 x uint8: 9*8*255 = 18360);
    5x5 int4 (51000) and int8 weights must take int32. All-extreme codes hit the bound."""
    c = 20
    lo, hi = code_range(w_bits)
    wc = np.full((c, 1, k, k), lo, dtype=np.int8)
    w = pack_weights(wc.reshape(c, -1), w_bits)
    scales = np.full(c, 0.01, dtype=np.float32)
    x = np.full((1, c, 7, 9), -1e4 if a_signed else 1e4, dtype=np.float32)
    geometry = ((k, k), (1, 1), (k // 2, k // 2), (1, 1), c)
    want = qconv2d(x, w, scales, 0.05, 8, a_signed, None, *geometry)
    got = qconv2d_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, scales, 0.05, 8, a_signed, None, *geometry)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
    a = -128 if a_signed else 255
    assert got[0, 3, 4, 0] == np.float32(k * k * lo * a) * np.float32(np.float32(0.05) * np.float32(0.01))


@pytest.mark.parametrize("c", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("spec", [(8, False), (4, True), (8, True)], ids=["u8", "s4", "s8"])
def test_pad_codes_match_numpy(c: int, channels_last: bool, spec: tuple) -> None:
    """``_pad_codes``' every layout branch (NHWC runs, NHWC with pad channels, NCHW rows)
    writes numpy's shifted codes into the padded buffer, code 0 at the border, zero pad channels, and each
    pixel's sum."""
    from bitmix.kernels.conv_nhwc import _pad_codes
    from bitmix.kernels.matmul import check_activation_spec

    lo, hi, shift = check_activation_spec(*spec)
    rng = np.random.default_rng(c)
    x = rng.normal(0, 3, size=(2, 5, 7, c)).astype(np.float32)
    step, ph, pw = np.float32(0.07), 2, 3
    c4 = -(-c // 4) * 4
    want = np.zeros((2, 5 + 2 * ph, 7 + 2 * pw, c4), dtype=np.int32)
    want[..., :c] = -shift
    want[:, ph:ph + 5, pw:pw + 7, :c] = np.rint(np.clip(x / step, lo, hi)).astype(np.int32) - shift
    out = np.full(want.shape, 99, dtype=np.int8)
    psum = np.zeros(want.shape[0] * want.shape[1] * want.shape[2], dtype=np.int64)
    arg = x if channels_last else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    assert not _pad_codes(arg, channels_last, step, lo, hi, shift, ph, pw, out, psum)
    np.testing.assert_array_equal(out, want.astype(np.int8))
    np.testing.assert_array_equal(psum, want.sum(axis=-1).reshape(-1))
    arg.reshape(-1)[5] = np.nan
    assert _pad_codes(arg, channels_last, step, lo, hi, shift, ph, pw, out, psum)


@pytest.mark.parametrize("variant", ["_code_borders_serial", "_code_borders_parallel"])
@pytest.mark.parametrize("c, pad", [(5, 1), (64, 0), (300, 2)])
@pytest.mark.parametrize("spec", [(8, False), (8, True), (2, False)], ids=["u8", "s8", "u2"])
def test_code_borders_complete_a_buffer_as_pad_codes_writes_it(variant: str, c: int, pad: int, spec: tuple) -> None:
    """A buffer whose interior codes an epilogue wrote (borders and pad channels left as garbage) is completed, by
    one thread or split by rows, into exactly ``_pad_codes``' buffer: border codes, zero pad channels, and pixel sums
    added in int32 (codes at both ends of the range, hundreds of channels)."""
    from bitmix.kernels import conv_nhwc
    from bitmix.kernels.matmul import check_activation_spec

    lo, hi, shift = check_activation_spec(*spec)
    rng = np.random.default_rng(c)
    h, w = 6, 5
    x = rng.choice(np.array([lo, hi, 0.4, -3.3], dtype=np.float32), size=(2, h, w, c)) * np.float32(0.07)
    c4 = -(-c // 4) * 4
    want = np.empty((2, h + 2 * pad, w + 2 * pad, c4), dtype=np.int8)
    want_sum = np.empty(want.shape[0] * want.shape[1] * want.shape[2], dtype=np.int64)
    assert not conv_nhwc._pad_codes(x, True, np.float32(0.07), lo, hi, shift, pad, pad, want, want_sum)
    got = rng.integers(-128, 128, size=want.shape, dtype=np.int8)  # garbage everywhere the GEMM does not write
    got[:, pad:pad + h, pad:pad + w, :c] = want[:, pad:pad + h, pad:pad + w, :c]
    got_sum = np.full_like(want_sum, 12345)
    getattr(conv_nhwc, variant)(got, got_sum, pad, pad, h, w, c, shift, True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_sum, want_sum)


DEPTHWISE_EDGES = [  # (C, H, W, k, stride, pad, dilation): C around the 16-channel blocks, 1-3 pixel planes,
    (1, 1, 1, 3, 1, 1, 1),  # windows mostly outside the input, 3x3 windows wholly inside it or not
    (15, 2, 3, 3, 1, 1, 1),
    (16, 3, 2, 3, 2, 1, 1),
    (17, 3, 3, 3, 1, 2, 1),
    (33, 5, 7, 3, 2, 1, 1),
    (48, 6, 9, 3, 1, 2, 2),
    (32, 4, 4, 3, 1, 0, 1),
    (20, 7, 6, 5, 2, 2, 1),
    (18, 3, 5, 1, 2, 0, 1),
]


@pytest.mark.parametrize("case", DEPTHWISE_EDGES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("spec", [(4, 8, False), (8, 8, False), (4, 8, True), (2, 4, True)],
                         ids=["w4u8", "w8u8", "w4s8", "w2s4"])
def test_depthwise_edges_equal_the_integer_reference(case: tuple, spec: tuple) -> None:
    """``depthwise`` on codes at every extreme (int16 and int32 sums) equals ``float32(exact sum) * scale + bias``
    clamped, bit for bit, and ``depthwise_to_codes`` equals ``_pad_codes`` on those floats (codes and sums)."""
    from bitmix.kernels.conv import conv_geometry
    from bitmix.kernels.conv_nhwc import _pad_codes, depthwise, depthwise_to_codes
    from bitmix.kernels.matmul import check_activation_spec

    c, h, wd, k, stride, pad, dil = case
    w_bits, a_bits, a_signed = spec
    rng = np.random.default_rng(c * 100 + h * 10 + wd + w_bits)
    lo, hi, _ = check_activation_spec(a_bits, a_signed)
    wlo, whi = code_range(w_bits)
    codes = rng.choice([lo, hi, 0, 1], size=(2, h, wd, c)).astype(np.int8 if lo < 0 else np.uint8)
    codes[0] = rng.integers(lo, hi, (h, wd, c), endpoint=True)
    wc = rng.choice([wlo, whi, 1], size=(c, k * k)).astype(np.int8)
    w = pack_weights(wc, w_bits)
    geom = conv_geometry((2, c, h, wd), w, k, stride, pad, dil, c)
    ho, wo = geom[9], geom[10]
    padded = np.zeros((2, h + 2 * pad, wd + 2 * pad, c), dtype=np.int64)
    padded[:, pad:pad + h, pad:pad + wd] = codes
    acc = np.zeros((2, ho, wo, c), dtype=np.int64)
    for i in range(k):
        for j in range(k):
            acc += padded[:, i * dil:i * dil + (ho - 1) * stride + 1:stride,
                          j * dil:j * dil + (wo - 1) * stride + 1:stride] * wc[:, i * k + j].astype(np.int64)
    scale = rng.uniform(0.001, 0.02, c).astype(np.float32)
    for bias, clamp in ((None, (np.float32(-np.inf), np.float32(np.inf))),
                        (rng.normal(size=c).astype(np.float32), (np.float32(0), np.float32(6)))):
        y = depthwise(codes, w, geom, lo, hi, scale, bias, None, clamp)
        want = acc.astype(np.float32) * scale
        want = want if bias is None else want + bias
        want = np.where(want < clamp[0], clamp[0], want)
        want = np.where(want > clamp[1], clamp[1], want)
        np.testing.assert_array_equal(y.view(np.int32), want.astype(np.float32).view(np.int32))
        for qspec, qpad in (((8, False), 1), ((4, True), 0), ((8, True), 2)):
            qlo, qhi, qshift = check_activation_spec(*qspec)
            nxt = (np.float32(0.03), qlo, qhi, qshift, qpad, qpad)
            got = depthwise_to_codes(codes, w, geom, lo, hi, scale, bias, clamp, nxt, None)
            a8 = np.full_like(got.a8, 99)
            psum = np.zeros_like(got.psum)
            _pad_codes(y, True, np.float32(0.03), qlo, qhi, qshift, qpad, qpad, a8, psum)
            np.testing.assert_array_equal(got.a8, a8)
            np.testing.assert_array_equal(got.psum, psum)
