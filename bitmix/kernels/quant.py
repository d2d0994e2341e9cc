"""Float-facing wrappers: activation quantization and the scaled ``qlinear``/``qconv2d``.

The float formulas are fixed so the compiler's fake-quant reference can reproduce them bit
for bit (all float32, in this order):

    codes = rint(clip(x / float32(a_step), lo, hi))          # round half to even
    y     = float32(acc) * (float32(a_step) * w_scales) + bias

where ``acc`` is the exact int32 kernel result and ``w_scales`` the per-output-channel
weight step sizes.
"""

from __future__ import annotations

import math

import numpy as np

from bitmix.errors import BitmixError
from bitmix.kernels.conv import conv2d
from bitmix.kernels.matmul import check_activation_spec, check_packed, gemm
from bitmix.kernels.pack import PackedWeight


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
    if np.isnan(x).any():
        raise BitmixError("x: contains NaN; cannot quantize")
    q = np.rint(np.clip(x / _step(step), lo, hi))
    return q.astype(np.int8 if signed else np.uint8)


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
    codes = quantize_activations(x.reshape(-1, w.k), a_step, a_bits, a_signed)
    acc = gemm(codes, w, a_bits, a_signed)
    y = acc.astype(np.float32) * (_step(a_step) * w_scales)[None, :]
    if bias is not None:
        y = y + bias[None, :]
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
    codes = quantize_activations(x, a_step, a_bits, a_signed)
    acc = conv2d(codes, w, kernel_size, stride, padding, dilation, groups, a_bits, a_signed)
    y = acc.astype(np.float32) * (_step(a_step) * w_scales)[None, :, None, None]
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y
