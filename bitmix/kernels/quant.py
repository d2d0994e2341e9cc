"""Float-facing wrappers: activation quantization and the scaled ``qlinear``/``qconv2d``.

The float formulas are fixed so the compiler's fake-quant reference can reproduce them bit
for bit (all float32, in this order):

    codes = rint(clip(x / float32(a_step), lo, hi))          # round half to even
    y     = float32(acc) * (float32(a_step) * w_scales) + bias

where ``acc`` is the exact int32 kernel result and ``w_scales`` the per-output-channel
weight step sizes. Each formula is one Numba pass (numpy needed one per operation, and
around the AMX engine those passes cost more than the product: a 3x3 conv with 64
channels at 56x56 spent 2.1 ms around a 0.2 ms GEMM). Convolutions on the AMX engine and
narrow depthwise ones fuse the layout change into the same passes: NCHW floats ->
channels-last codes, and (pixels, C_out) accumulators -> NCHW floats.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels.conv import (
    conv2d,
    conv_acc_channels_last,
    conv_geometry,
    depthwise_channels_last,
    depthwise_conv,
)
from bitmix.kernels.conv_nhwc import _quantize_flat, _quantize_to_channels_last, conv_nhwc
from bitmix.kernels.conv_simd import conv_simd
from bitmix.kernels.matmul import check_activation_spec, check_packed, gemm
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.routing import dispatch

DEPTHWISE_NCHW_MIN_WIDTH = 32


def _f32(arr: object, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
        raise BitmixError(f"{name}: expected a float32 numpy array, got {getattr(arr, 'dtype', type(arr).__name__)}")
    if shape is not None and arr.shape != shape:
        raise BitmixError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr


def _step(a_step: float) -> np.float32:
    s = np.float32(a_step)
    if not (math.isfinite(float(s)) and s > 0):
        raise BitmixError(f"a_step={a_step!r}: must be a finite positive number")
    return s


def quantize_activations(x: np.ndarray, step: float, bits: int, signed: bool) -> np.ndarray:
    """``rint(clip(x / float32(step), lo, hi))`` in float32, as int8 (signed) or uint8 codes.

    Matches torch's ``torch.round(torch.clamp(x / s, lo, hi))`` bit for bit.
    """
    x = _f32(x, "x")
    lo, hi, _ = check_activation_spec(bits, signed)
    x = np.ascontiguousarray(x)
    codes = np.empty(x.shape, dtype=np.int8 if signed else np.uint8)
    if x.size and _quantize_flat(x.reshape(-1), _step(step), lo, hi, codes.reshape(-1)):
        raise BitmixError("x: contains NaN; cannot quantize")
    return codes


@njit(parallel=True, cache=True)
def _dequantize_to_nchw(acc, scale, bias, has_bias, hw, out):
    """``out[b, c, p] = float32(acc[b * hw + p, c]) * scale[c] (+ bias[c])``, 64 pixels per block."""
    nb, n, _ = out.shape
    blocks = (hw + 63) // 64
    for t in prange(nb * blocks):
        b = t // blocks
        p0 = (t - b * blocks) * 64
        p1 = min(hw, p0 + 64)
        for c in range(n):
            s = scale[c]
            for p in range(p0, p1):
                y = np.float32(acc[b * hw + p, c]) * s
                if has_bias:
                    y = y + bias[c]
                out[b, c, p] = y


@njit(parallel=True, cache=True)
def _dequantize_rows(acc, scale, bias, has_bias, out):
    """``out[i, c] = float32(acc[i, c]) * scale[c] (+ bias[c])`` in one pass (numpy took three)."""
    m, n = out.shape
    for i in prange(m):
        for c in range(n):
            y = np.float32(acc[i, c]) * scale[c]
            if has_bias:
                y = y + bias[c]
            out[i, c] = y


@njit(parallel=True, cache=True)
def _dequantize_nchw(acc, scale, bias, has_bias, out):
    """``out[b, c] = float32(acc[b, c]) * scale[c] (+ bias[c])`` for (B, C, HW) arrays."""
    nb, n, hw = out.shape
    for t in prange(nb * n):
        b = t // n
        c = t - b * n
        s = scale[c]
        for p in range(hw):
            y = np.float32(acc[b, c, p]) * s
            if has_bias:
                y = y + bias[c]
            out[b, c, p] = y


def qlinear(
    x: np.ndarray,
    w: PackedWeight,
    w_scales: np.ndarray,
    a_step: float,
    a_bits: int,
    a_signed: bool,
    bias: np.ndarray | None,
) -> np.ndarray:
    """Quantized linear: ``float32(gemm(codes(x), w)) * (float32(a_step) * w_scales)[None, :] + bias``.

    ``x`` is (..., K) float32; leading dimensions are flattened into M and restored.
    """
    w = check_packed(w)
    x = _f32(x, "x")
    if x.ndim < 1 or x.shape[-1] != w.k:
        raise BitmixError(f"x: last dimension must be K={w.k}, got shape {x.shape}")
    w_scales = _f32(w_scales, "w_scales", (w.n,))
    if bias is not None:
        bias = _f32(bias, "bias", (w.n,))
    if not x.size:  # an empty batch (K >= 1 is checked): the GEMM takes M >= 1
        return np.empty((*x.shape[:-1], w.n), dtype=np.float32)
    codes = quantize_activations(x.reshape(-1, w.k), a_step, a_bits, a_signed)
    acc = gemm(codes, w, a_bits, a_signed)
    scale = _step(a_step) * w_scales
    y = np.empty(acc.shape, dtype=np.float32)
    _dequantize_rows(acc, scale, scale if bias is None else bias, bias is not None, y)
    return y.reshape(*x.shape[:-1], w.n)


def qconv2d(
    x: np.ndarray,
    w: PackedWeight,
    w_scales: np.ndarray,
    a_step: float,
    a_bits: int,
    a_signed: bool,
    bias: np.ndarray | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """Quantized conv2d; per-output-channel scales broadcast over (B, C_out, Ho, Wo):

    ``float32(conv2d(codes(x), w)) * (float32(a_step) * w_scales)[None, :, None, None] + bias``.
    """
    w = check_packed(w)
    x = _f32(x, "x")
    w_scales = _f32(w_scales, "w_scales", (w.n,))
    if bias is not None:
        bias = _f32(bias, "bias", (w.n,))
    if x.ndim == 4 and x.shape[0] == 0:
        return _empty_batch(x.shape, w, kernel_size, stride, padding, dilation, groups, channels_last=False)
    if x.ndim == 4 and x.size:
        geom = conv_geometry(x.shape, w, kernel_size, stride, padding, dilation, groups, name="x")
        nb, ho, wo = x.shape[0], geom[-2], geom[-1]
        scale = _step(a_step) * w_scales
        has_bias = bias is not None
        y = np.empty((nb, w.n, ho * wo), dtype=np.float32)
        depthwise = geom[8] > 1 and x.shape[1] == geom[8]
        # Depthwise: output rows of >= 32 vectorise well in the NCHW loop; narrower planes (late
        # MobileNet stages, 14x14 x 384: 0.28 -> 0.14 ms) vectorise over channels instead, which
        # needs one output channel per input channel.
        if depthwise and (w.n != x.shape[1] or wo >= DEPTHWISE_NCHW_MIN_WIDTH):
            acc = depthwise_conv(quantize_activations(x, a_step, a_bits, a_signed), w, geom)
            _dequantize_nchw(acc.reshape(nb, w.n, ho * wo), scale, bias if has_bias else scale, has_bias, y)
            return y.reshape(nb, w.n, ho, wo)
        settings = dispatch.settings
        if depthwise or settings.uses_amx(w, nb * ho * wo, geom[8]):
            lo, hi, shift = check_activation_spec(a_bits, a_signed)
            codes = np.empty((nb, x.shape[2], x.shape[3], x.shape[1]), dtype=np.int8 if a_signed else np.uint8)
            if _quantize_to_channels_last(np.ascontiguousarray(x), _step(a_step), lo, hi, codes):
                raise BitmixError("x: contains NaN; cannot quantize")
            if depthwise:
                acc = depthwise_channels_last(codes, w, geom)
                _dequantize_to_nchw(acc, scale, bias if has_bias else scale, has_bias, ho * wo, y)
            else:
                conv_acc_channels_last(codes, w, geom, shift, nchw=(scale, bias, ho * wo, y), settings=settings)
            return y.reshape(nb, w.n, ho, wo)
        if geom[8] == 1:
            lo, hi, shift = check_activation_spec(a_bits, a_signed)
            acc = conv_simd(x, w, geom, _step(a_step), lo, hi, shift, settings, _quantize_to_channels_last)
            if acc is None:
                raise BitmixError("x: contains NaN; cannot quantize")
            _dequantize_to_nchw(acc, scale, bias if has_bias else scale, has_bias, ho * wo, y)
            return y.reshape(nb, w.n, ho, wo)
    codes = quantize_activations(x, a_step, a_bits, a_signed)
    acc = conv2d(codes, w, kernel_size, stride, padding, dilation, groups, a_bits, a_signed)
    y = acc.astype(np.float32) * (_step(a_step) * w_scales)[None, :, None, None]
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y


def qconv2d_nhwc(
    x: np.ndarray,
    w: PackedWeight,
    w_scales: np.ndarray,
    a_step: float,
    a_bits: int,
    a_signed: bool,
    bias: np.ndarray | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    channels_last: bool = True,
) -> np.ndarray:
    """``qconv2d`` with channels-last output ``(B, Ho, Wo, C_out)``; ``x`` is (B, H, W, C_in), or
    (B, C_in, H, W) when not ``channels_last``. Bit-identical to ``qconv2d`` (``conv_nhwc``)."""
    w = check_packed(w)
    x = _f32(x, "x")
    if x.ndim != 4 or not x.size and x.shape[0]:
        raise BitmixError(f"x: expected a 4-D array, non-empty past the batch dimension, got shape {x.shape}")
    w_scales = _f32(w_scales, "w_scales", (w.n,))
    if bias is not None:
        bias = _f32(bias, "bias", (w.n,))
    nchw = x.transpose(0, 3, 1, 2) if channels_last else x
    if not x.shape[0]:
        return _empty_batch(nchw.shape, w, kernel_size, stride, padding, dilation, groups, channels_last=True)
    geom = conv_geometry(nchw.shape, w, kernel_size, stride, padding, dilation, groups, name="x")
    c = nchw.shape[1]
    if geom[8] > 1 and not geom[8] == c == w.n:  # grouped, or depthwise with a channel multiplier
        y = qconv2d(np.ascontiguousarray(nchw), w, w_scales, a_step, a_bits, a_signed, bias, kernel_size, stride,
                    padding, dilation, groups)
        return np.ascontiguousarray(y.transpose(0, 2, 3, 1))
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    return conv_nhwc(np.ascontiguousarray(x), w, geom, _step(a_step), lo, hi, shift, _step(a_step) * w_scales, bias,
                     channels_last)


def _empty_batch(shape: tuple[int, ...], w: PackedWeight, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, channels_last: bool) -> np.ndarray:
    """A conv of an empty batch (NCHW ``shape``): torch's empty output, after the same geometry checks as one
    example (the kernels' loops and im2col assume rows)."""
    geom = conv_geometry((1, *shape[1:]), w, kernel_size, stride, padding, dilation, groups, name="x")
    ho, wo = geom[-2], geom[-1]
    return np.empty((0, ho, wo, w.n) if channels_last else (0, w.n, ho, wo), dtype=np.float32)
