"""Float wrappers: quantization matches torch fake quant; scaling follows the documented formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitmix.errors import BitmixError
from bitmix.kernels import conv2d, gemm, pack_weights, qconv2d, qlinear, quantize_activations
from bitmix.kernels.pack import code_range


@pytest.mark.parametrize(("bits", "signed"), [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
def test_quantize_matches_torch_fake_quant(bits: int, signed: bool) -> None:
    rng = np.random.default_rng(bits)
    step = 0.0371
    halves = (np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)) * np.float32(step)
    x = np.concatenate([rng.normal(0, 3, 5000).astype(np.float32), halves, [np.inf, -np.inf]]).astype(np.float32)
    lo, hi = code_range(bits, signed)
    want = torch.round(torch.clamp(torch.from_numpy(x) / step, lo, hi)).numpy()
    got = quantize_activations(x, step, bits, signed)
    assert got.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(got.astype(np.float32), want)


def test_round_half_to_even() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], dtype=np.float32)
    assert quantize_activations(x, 1.0, 8, True).tolist() == [0, 2, 2, 0, -2]


def test_qlinear_formula(kernel_path: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 70)).astype(np.float32)
    wc = rng.integers(-8, 8, (5, 70)).astype(np.int8)
    w = pack_weights(wc, 4)
    scales = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    y = qlinear(x, w, scales, 0.05, 8, True, bias)
    acc = gemm(quantize_activations(x.reshape(-1, 70), 0.05, 8, True), w, 8, True)
    want = acc.astype(np.float32) * (np.float32(0.05) * scales)[None, :] + bias
    assert y.dtype == np.float32 and y.shape == (2, 3, 5)
    np.testing.assert_array_equal(y.reshape(6, 5), want)
    no_bias = acc.astype(np.float32) * (np.float32(0.05) * scales)[None, :]
    np.testing.assert_array_equal(qlinear(x[0], w, scales, 0.05, 8, True, None), no_bias[:3])


def test_qconv2d_formula(kernel_path: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    wc = rng.integers(-2, 2, (6, 2, 3, 3)).astype(np.int8)
    w = pack_weights(wc.reshape(6, -1), 2)
    scales = rng.uniform(0.01, 0.1, 6).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    y = qconv2d(x, w, scales, 0.1, 4, False, bias, (3, 3), (2, 2), (1, 1), (1, 1), 2)
    acc = conv2d(quantize_activations(x, 0.1, 4, False), w, (3, 3), (2, 2), (1, 1), (1, 1), 2, 4, False)
    want = acc.astype(np.float32) * (np.float32(0.1) * scales)[None, :, None, None] + bias[None, :, None, None]
    np.testing.assert_array_equal(y, want)


def test_bad_float_inputs() -> None:
    w = pack_weights(np.zeros((3, 8), np.int8), 8)
    x = np.zeros((2, 8), np.float32)
    s = np.ones(3, np.float32)
    with pytest.raises(BitmixError, match="x"):
        qlinear(x.astype(np.float64), w, s, 0.1, 8, True, None)
    with pytest.raises(BitmixError, match="x"):
        qlinear(np.zeros((2, 9), np.float32), w, s, 0.1, 8, True, None)
    with pytest.raises(BitmixError, match="w_scales"):
        qlinear(x, w, np.ones(4, np.float32), 0.1, 8, True, None)
    with pytest.raises(BitmixError, match="bias"):
        qlinear(x, w, s, 0.1, 8, True, np.ones(3, np.float64))
    with pytest.raises(BitmixError, match="a_step"):
        qlinear(x, w, s, 0.0, 8, True, None)
    with pytest.raises(BitmixError, match="x"):
        quantize_activations(np.array([np.nan], np.float32), 0.1, 8, True)


@pytest.mark.parametrize("multiplier,width", [(1, 8), (1, 70), (2, 8)])
def test_qconv2d_depthwise_formula(kernel_path: str, multiplier: int, width: int) -> None:
    """One input channel per group runs a direct loop (channels-last for narrow planes, NCHW
    for wide ones or channel multipliers); same formula, same bits."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 9, width)).astype(np.float32)
    wc = rng.integers(-8, 8, (5 * multiplier, 1, 3, 3)).astype(np.int8)
    w = pack_weights(wc.reshape(5 * multiplier, -1), 4)
    scales = rng.uniform(0.01, 0.1, 5 * multiplier).astype(np.float32)
    bias = rng.normal(size=5 * multiplier).astype(np.float32)
    geometry = ((3, 3), (2, 1), (1, 2), (1, 2), 5)
    y = qconv2d(x, w, scales, 0.1, 8, False, bias, *geometry)
    codes = quantize_activations(x, 0.1, 8, False)
    acc = conv2d(codes, w, *geometry, 8, False)
    ref = F.conv2d(torch.from_numpy(codes.astype(np.float64)), torch.from_numpy(wc.astype(np.float64)),
                   stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=5)
    np.testing.assert_array_equal(acc, ref.numpy().astype(np.int64))
    want = acc.astype(np.float32) * (np.float32(0.1) * scales)[None, :, None, None] + bias[None, :, None, None]
    np.testing.assert_array_equal(y, want)
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(BitmixError, match="NaN"):
        qconv2d(x, w, scales, 0.1, 8, False, bias, *geometry)


@pytest.mark.parametrize(
    ("c", "k", "stride", "pad", "dil", "w_bits", "a_bits", "a_signed"),
    [
        (70, 1, 1, 0, 1, 4, 8, False),  # 1x1: quantized straight into GEMM rows
        (16, 1, 2, 0, 1, 8, 8, True),
        (5, 3, 1, 1, 1, 4, 8, False),  # k x k: channels-last patches, weight re-packed (kh, kw, c)
        (33, 3, 2, 1, 2, 2, 4, True),
        (3, 7, 2, 3, 1, 8, 8, False),
    ],
)
def test_qconv2d_one_group_matches_nchw_route(kernel_path: str, c: int, k: int, stride: int, pad: int, dil: int,
                                              w_bits: int, a_bits: int, a_signed: bool) -> None:
    """The channels-last route (``conv_simd``) gives the NCHW ``conv2d`` result bit for bit, padding included."""
    rng = np.random.default_rng(c * k)
    x = rng.normal(0, 2, size=(2, c, 9, 11)).astype(np.float32)
    lo, hi = code_range(w_bits)
    wc = rng.integers(lo, hi, (12, c, k, k), endpoint=True).astype(np.int8)
    w = pack_weights(wc.reshape(12, -1), w_bits)
    scales = rng.uniform(0.01, 0.1, 12).astype(np.float32)
    bias = rng.normal(size=12).astype(np.float32)
    geometry = ((k, k), (stride, stride), (pad, pad), (dil, dil), 1)
    y = qconv2d(x, w, scales, 0.05, a_bits, a_signed, bias, *geometry)
    acc = conv2d(quantize_activations(x, 0.05, a_bits, a_signed), w, *geometry, a_bits, a_signed)
    want = acc.astype(np.float32) * (np.float32(0.05) * scales)[None, :, None, None] + bias[None, :, None, None]
    np.testing.assert_array_equal(y, want)
    ref = F.conv2d(torch.round(torch.clamp(torch.from_numpy(x) / 0.05, *code_range(a_bits, a_signed))).double(),
                   torch.from_numpy(wc).double(), None, stride, pad, dil)
    np.testing.assert_array_equal(acc, ref.numpy().astype(np.int32))


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_an_empty_batch_gives_torchs_empty_output_after_the_same_checks(groups: int) -> None:
    """qconv2d / qconv2d_nhwc / qlinear of 0 examples: the shape F.conv2d / F.linear give (the GEMM and im2col
    refused 0 rows, so a compiled or loaded conv model could not take an empty batch), geometry still checked."""
    from bitmix.kernels import qconv2d_nhwc

    rng = np.random.default_rng(0)
    w = pack_weights(rng.integers(-8, 8, (8, 8 // groups * 9)).astype(np.int8), 4)
    scales, bias = np.full(8, 0.1, np.float32), np.zeros(8, np.float32)
    x = np.zeros((0, 8, 7, 6), np.float32)
    want = F.conv2d(torch.zeros(0, 8, 7, 6), torch.zeros(8, 8 // groups, 3, 3), stride=2, padding=1, groups=groups)
    args = (w, scales, 0.1, 4, True, bias, (3, 3), (2, 2), (1, 1), (1, 1), groups)
    assert qconv2d(x, *args).shape == want.shape
    assert qconv2d_nhwc(x.transpose(0, 2, 3, 1), *args).shape == want.permute(0, 2, 3, 1).shape
    assert qconv2d_nhwc(x, *args, channels_last=False).shape == want.permute(0, 2, 3, 1).shape
    with pytest.raises(BitmixError, match="too small"):
        qconv2d(np.zeros((0, 8, 1, 1), np.float32), w, scales, 0.1, 4, True, bias, (3, 3), groups=groups)
    with pytest.raises(BitmixError, match="non-empty past the batch"):
        qconv2d_nhwc(np.zeros((2, 0, 6, 8), np.float32), *args)
    lin = pack_weights(rng.integers(-8, 8, (5, 12)).astype(np.int8), 4)
    assert qlinear(np.zeros((0, 3, 12), np.float32), lin, np.ones(5, np.float32), 0.1, 4, True, None).shape == (0, 3, 5)
