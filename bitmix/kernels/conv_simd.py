"""Float conv2d on the vpdpbusd / vpmaddubsw kernels, fed channels-last (issue 15).

The NCHW route (``conv.conv2d``) quantizes, then gathers every patch from NCHW codes one
byte at a time, then transposes the int32 result back and scales it in numpy: on a
VNNI CPU without AMX that gather was half of a ResNet's forward. Here one group of a conv
runs in three fused passes, each a parallel Numba loop:

* 1x1, stride 1, no padding: the GEMM's activation rows *are* the pixels, so NCHW floats
  are quantized straight into the ``(pixels, k_pad)`` byte rows (shifted to signed bytes,
  pad columns zeroed, row sums on the fly) -- no im2col.
* k x k: floats are quantized into channels-last codes, and each patch row is then ``kw``
  runs of ``C`` contiguous bytes (K ordered ``(kh, kw, c)``); the weight is re-packed once
  in that order (``taps_first``), cached per packed weight like the AMX engine's tiles.
* the int32 ``(pixels, C_out)`` result is scaled (and biased) into NCHW floats in one pass.

Integer results are exact, so the K order does not change them: bit-exact with ``conv2d``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from bitmix.kernels.launch import activation_layout, run_core
from bitmix.kernels.pack import PackedWeight, pack_weights, unpack_weights
from bitmix.kernels.routing import DispatchSettings
from bitmix.kernels.scratch import scratch

PIXEL_BLOCK = 64  # pixels per task of the 1x1 quantize pass: 64 rows of k_pad bytes stay in L1/L2


@njit(parallel=True, cache=True)
def _quantize_pixels(x, step, lo, hi, shift, kp, a8, asum):
    """``a8[b*hw + p, c] = rint(clip(x[b, c, p] / step, lo, hi)) - shift`` (pad columns 0),
    ``asum[row]`` = the row's sum; True if any NaN was seen."""
    nb, c, hw = x.shape
    flo = np.float32(lo)
    fhi = np.float32(hi)
    blocks = (hw + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    nan = np.zeros(nb * blocks, dtype=np.bool_)
    for t in prange(nb * blocks):
        b = t // blocks
        p0 = (t - b * blocks) * PIXEL_BLOCK
        p1 = min(hw, p0 + PIXEL_BLOCK)
        seen = False
        sums = np.zeros(PIXEL_BLOCK, dtype=np.int64)
        for ci in range(c):
            src = x[b, ci]
            for p in range(p0, p1):
                v = src[p] / step
                seen |= v != v
                q = np.int32(np.rint(min(max(v, flo), fhi))) - shift
                a8[(b * hw + p) * kp + ci] = q
                sums[p - p0] += q
        for p in range(p0, p1):
            row = (b * hw + p) * kp
            for q in range(c, kp):
                a8[row + q] = 0
            asum[b * hw + p] = sums[p - p0]
        nan[t] = seen
    return nan.any()


@njit(parallel=True, cache=True)
def _patches(x, shift, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, kp, a8, asum):
    """Channels-last im2col: row ``(b, oh, ow)`` = the ``kh*kw`` taps' ``C`` codes, shifted
    (padding taps hold ``-shift``, the shifted code 0), pad columns 0, row sums in ``asum``."""
    nb, h, w, c = x.shape
    xf = x.reshape(-1)
    sh32 = np.int32(shift)
    k = kh * kw * c
    for row in prange(nb * ho * wo):
        b = row // (ho * wo)
        rem = row - b * ho * wo
        oh = rem // wo
        ow = rem - oh * wo
        base = row * kp
        s = 0
        for i in range(kh):
            ih = oh * sh - ph + i * dh
            for j in range(kw):
                iw = ow * sw - pw + j * dw
                d0 = base + (i * kw + j) * c
                if 0 <= ih < h and 0 <= iw < w:
                    s0 = ((b * h + ih) * w + iw) * c
                    for q in range(c):
                        v = np.int32(xf[np.uintp(s0 + q)]) - sh32
                        a8[np.uintp(d0 + q)] = v
                        s += v
                else:
                    for q in range(c):
                        a8[np.uintp(d0 + q)] = -sh32
                    s -= sh32 * c
        for q in range(k, kp):
            a8[base + q] = 0
        asum[row] = s


_TAPS_FIRST: weakref.WeakKeyDictionary[PackedWeight, PackedWeight] = weakref.WeakKeyDictionary()


def taps_first(w: PackedWeight, c: int, kh: int, kw: int) -> PackedWeight:
    """``w`` (K ordered ``(c, kh, kw)``) re-packed with K ordered ``(kh, kw, c)``; cached per weight."""
    if kh == kw == 1:
        return w
    p = _TAPS_FIRST.get(w)
    if p is None:
        codes = unpack_weights(w).reshape(w.n, c, kh, kw).transpose(0, 2, 3, 1).reshape(w.n, -1)
        p = _TAPS_FIRST[w] = pack_weights(np.ascontiguousarray(codes), w.bits)
    return p


def conv_simd(x: np.ndarray, w: PackedWeight, geom: tuple[int, ...], step: np.float32, lo: int, hi: int,
              shift: int, settings: DispatchSettings, to_channels_last: Callable[..., bool]) -> np.ndarray | None:
    """int32 ``(B * Ho * Wo, C_out)`` of a one-group conv of NCHW float32 ``x`` (module docstring),
    in this thread's scratch buffer, or None if ``x`` has NaN. ``to_channels_last`` is the
    NCHW -> NHWC quantize pass of ``quant``."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, ho, wo = geom
    nb, c, h, wd = x.shape
    m = nb * ho * wo
    mp, kp = activation_layout(w, m, 1, settings)
    a8 = scratch("conv.a8", mp * kp, np.int8)
    asum = scratch("conv.asum", mp, np.int64)
    x = np.ascontiguousarray(x)
    if kh == kw == sh == sw == 1 and ph == pw == 0:
        if _quantize_pixels(x.reshape(nb, c, h * wd), step, lo, hi, shift, kp, a8, asum):
            return None
    else:
        codes = scratch("conv.codes", (nb, h, wd, c), np.int8 if lo < 0 else np.uint8)
        if to_channels_last(x, step, lo, hi, codes):
            return None
        _patches(codes, shift, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, kp, a8, asum)
    if mp > m:
        a8[m * kp :] = 0
        asum[m:] = 0
    out = scratch("conv.acc", (m, w.n), np.int32)
    run_core(a8, asum, taps_first(w, c, kh, kw), shift, 1, m, mp, out, settings=settings)
    return out
