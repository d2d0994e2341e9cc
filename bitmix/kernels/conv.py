"""Bit-packed integer conv2d: im2col into signed bytes, then the GEMM engines.

Three routes (``M = B * Ho * Wo`` output pixels):

* vpdpbusd kernels (small products, and grouped convs with several input channels per
  group): im2col from NCHW codes into the padded ``(groups, M_pad, k_pad)`` byte buffer,
  K ordered ``(c, kh, kw)`` like ``weight.reshape(C_out, -1)``, fusing the activation
  shift and the row sums, so the kernels see exactly what ``gemm`` would. Groups become the group axis of one parallel
  launch rather than one launch per group.
* depthwise (groups > 1, one input channel each): a direct loop on the unpacked codes, per
  output channel and kernel tap one vectorised pass over output rows (``qconv2d`` runs
  narrow planes channels-last instead, vectorised over channels) -- im2col would pad each
  3x3 patch to a 64-code block (int4) and write 7x the input per channel.
* AMX engine (one group, enough pixels): codes channels-last ``(B, H, W, C)``, so each
  kernel tap of an output pixel is one contiguous run of C bytes and im2col is a copy of
  runs; K is ordered ``(kh, kw, c)`` and the engine's weight tiles are reordered to match
  (``amx.weight_tiles``). ``qconv2d`` quantizes straight into this layout.

Zero padding inserts code 0 (symmetric quantization: zero-point 0).
"""

from __future__ import annotations

import weakref

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels.launch import activation_layout, run_core
from bitmix.kernels.matmul import check_activation_spec, check_packed, check_range
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.routing import DispatchSettings, dispatch
from bitmix.kernels.scratch import scratch


@njit(parallel=True, cache=True)
def _im2col(x, shift, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, mp, kp, a8, asum):
    nb, c, h, w = x.shape
    cg = c // groups
    m = nb * ho * wo
    for t in prange(groups * m):
        g = t // m
        row = t - g * m
        b = row // (ho * wo)
        rem = row - b * ho * wo
        oh = rem // wo
        ow = rem - oh * wo
        base = (g * mp + row) * kp
        s = 0
        col = 0
        for ci in range(cg):
            ch = g * cg + ci
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                inside_h = 0 <= ih < h
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    v = -shift
                    if inside_h and 0 <= iw < w:
                        v = np.int64(x[b, ch, ih, iw]) - shift
                    a8[base + col] = v
                    s += v
                    col += 1
        asum[g * mp + row] = s


@njit(parallel=True, cache=True)
def _im2col_nhwc(x, shift, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, kp, a8):
    nb, h, w, c = x.shape
    xf = x.reshape(-1)
    pad = np.int32(-shift)
    sh32 = np.int32(shift)
    for row in prange(nb * ho * wo):
        b = row // (ho * wo)
        rem = row - b * ho * wo
        oh = rem // wo
        ow = rem - oh * wo
        base = row * kp
        iw0 = ow * sw - pw
        whole = dw == 1 and iw0 >= 0 and iw0 + kw <= w  # a row's kw taps are one run of kw*c bytes
        for i in range(kh):
            ih = oh * sh - ph + i * dh
            d0 = base + i * kw * c
            if whole and 0 <= ih < h:
                s0 = ((b * h + ih) * w + iw0) * c
                dst = a8[d0 : d0 + kw * c]
                src = xf[s0 : s0 + kw * c]
                for q in range(kw * c):
                    dst[q] = np.int32(src[q]) - sh32
                continue
            for j in range(kw):
                iw = iw0 + j * dw
                dst = a8[d0 + j * c : d0 + (j + 1) * c]
                if 0 <= ih < h and 0 <= iw < w:
                    s0 = ((b * h + ih) * w + iw) * c
                    src = xf[s0 : s0 + c]
                    for q in range(c):
                        dst[q] = np.int32(src[q]) - sh32
                else:
                    for q in range(c):
                        dst[q] = pad


@njit(parallel=True, cache=True)
def _depthwise(x, wc, per_group, kh, kw, sh, sw, ph, pw, dh, dw, out):
    """``out[b, o] = sum_ij x[b, o // per_group] (shifted by tap ij) * wc[o, i * kw + j]`` (int32, exact)."""
    nb, _, h, w = x.shape
    n = wc.shape[0]
    ho, wo = out.shape[2], out.shape[3]
    for t in prange(nb * n):
        b = t // n
        o = t - b * n
        g = o // per_group
        acc = out[b, o]
        acc[:] = 0
        for i in range(kh):
            for j in range(kw):
                wt = np.int32(wc[o, i * kw + j])
                off = j * dw - pw
                lo = max(0, -((off) // sw))  # first ow with ow*sw + off >= 0
                hi = min(wo, (w - 1 - off) // sw + 1)  # one past the last ow with ow*sw + off < w
                if wt == 0 or lo >= hi:
                    continue
                for oh in range(ho):
                    ih = oh * sh - ph + i * dh
                    if 0 <= ih < h:
                        row = x[b, g, ih]
                        dst = acc[oh]
                        # unsigned indices skip Numba's negative-index wraparound, which blocks
                        # vectorisation; constant strides let LLVM use unit or de-interleaving loads
                        if sw == 1:
                            for ow in range(lo, hi):
                                dst[np.uintp(ow)] += np.int32(row[np.uintp(ow + off)]) * wt
                        elif sw == 2:
                            for ow in range(lo, hi):
                                dst[np.uintp(ow)] += np.int32(row[np.uintp(2 * ow + off)]) * wt
                        else:
                            for ow in range(lo, hi):
                                dst[np.uintp(ow)] += np.int32(row[np.uintp(ow * sw + off)]) * wt


@njit(parallel=True, cache=True)
def _depthwise_channels_last(x, taps, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, out):
    """``out[pixel, c] = sum_ij x[b, ih, iw, c] * taps[i * kw + j, c]``: vectorised over channels,
    which suits the small planes and wide layers of late MobileNet stages (7x7 x 960)."""
    nb, h, w, c = x.shape
    for t in prange(nb * ho):
        b = t // ho
        oh = t - b * ho
        for ow in range(wo):
            acc = out[t * wo + ow]
            acc[:] = 0
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    if 0 <= iw < w:
                        src = x[b, ih, iw]
                        wt = taps[i * kw + j]
                        for q in range(c):
                            acc[np.uintp(q)] += np.int32(src[np.uintp(q)]) * wt[np.uintp(q)]


_CODES: weakref.WeakKeyDictionary[PackedWeight, np.ndarray] = weakref.WeakKeyDictionary()


def _weight_codes(w: PackedWeight) -> np.ndarray:
    codes = _CODES.get(w)
    if codes is None:
        codes = _CODES[w] = unpack_weights(w)
    return codes


def depthwise_conv(x: np.ndarray, w: PackedWeight, geom: tuple[int, ...]) -> np.ndarray:
    """int32 (B, C_out, Ho, Wo) of a conv with one input channel per group, on raw codes."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo = geom
    out = np.empty((x.shape[0], w.n, ho, wo), dtype=np.int32)
    _depthwise(np.ascontiguousarray(x), _weight_codes(w), w.n // groups, kh, kw, sh, sw, ph, pw, dh, dw, out)
    return out


def depthwise_channels_last(x_nhwc: np.ndarray, w: PackedWeight, geom: tuple[int, ...]) -> np.ndarray:
    """int32 ``(B * Ho * Wo, C)`` of a depthwise conv (one output channel per group) on channels-last
    codes, in this thread's scratch buffer (valid until its next conv)."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, ho, wo = geom
    taps = np.ascontiguousarray(_weight_codes(w).T.astype(np.int32))
    out = scratch("conv.acc", (x_nhwc.shape[0] * ho * wo, w.n), np.int32)
    _depthwise_channels_last(x_nhwc, taps, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, out)
    return out


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints and check its lower bound."""
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= minimum for v in pair):
        raise BitmixError(f"{name}={value!r}: expected an int or a pair of ints >= {minimum}")
    return int(pair[0]), int(pair[1])


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (torch's formula)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_geometry(
    shape: tuple[int, ...],
    w: PackedWeight,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
    name: str = "a_codes",
) -> tuple[int, ...]:
    """Validate a conv against the shape (B, C_in, H, W) of input ``name`` and the packed weight;
    return ``(kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo)``."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    nb, c, h, wd = shape
    if not isinstance(groups, int | np.integer) or groups < 1 or c % groups or w.n % groups:
        raise BitmixError(f"groups={groups!r}: must be >= 1 and divide C_in={c} and C_out={w.n}")
    if w.k != (c // groups) * kh * kw:
        raise BitmixError(
            f"w: packed K={w.k} but C_in/groups*kh*kw = {c // groups}*{kh}*{kw} = {(c // groups) * kh * kw}"
        )
    ho = conv_out_size(h, kh, sh, ph, dh)
    wo = conv_out_size(wd, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise BitmixError(f"{name}: spatial size {(h, wd)} too small for kernel/padding/dilation (output {ho}x{wo})")
    return kh, kw, sh, sw, ph, pw, dh, dw, int(groups), ho, wo


def conv_acc_channels_last(x_nhwc: np.ndarray, w: PackedWeight, geom: tuple[int, ...], shift: int,
                           nchw: tuple | None = None, settings: DispatchSettings | None = None) -> np.ndarray | None:
    """int32 ``(B * Ho * Wo, C_out)`` result of a one-group conv on channels-last codes (AMX engine),
    in this thread's scratch buffer (valid until its next conv); with ``nchw`` = (scale, bias,
    hw, y) the engine writes the dequantized NCHW output into ``y`` instead and this returns None."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, ho, wo = geom
    m = x_nhwc.shape[0] * ho * wo
    mp, kp = activation_layout(w, m, 1, settings)
    a8 = scratch("conv.a8", mp * kp, np.int8)  # pad rows/columns are ignored by the AMX engine
    _im2col_nhwc(x_nhwc, shift, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, kp, a8)
    out = None if nchw is not None else scratch("conv.acc", (m, w.n), np.int32)
    run_core(a8, np.zeros(0, dtype=np.int64), w, shift, 1, m, mp, out, taps=(x_nhwc.shape[3], kh, kw), nchw=nchw,
             settings=settings)
    return out


def conv2d(
    a_codes: np.ndarray,
    w: PackedWeight,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    a_bits: int,
    a_signed: bool,
) -> np.ndarray:
    """Exact int32 conv2d of (B, C_in, H, W) codes with weights packed from (C_out, C_in/groups*kh*kw)."""
    w = check_packed(w)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    if not isinstance(a_codes, np.ndarray) or a_codes.dtype.kind not in "iu":
        raise BitmixError(f"a_codes: expected an integer numpy array, got {getattr(a_codes, 'dtype', type(a_codes))}")
    if a_codes.ndim != 4 or a_codes.size == 0:
        raise BitmixError(f"a_codes: expected a non-empty (B, C_in, H, W) array, got shape {a_codes.shape}")
    geom = conv_geometry(a_codes.shape, w, kernel_size, stride, padding, dilation, groups)
    kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo = geom
    check_range(int(a_codes.min()), int(a_codes.max()), lo, hi, a_bits, a_signed)
    nb = a_codes.shape[0]
    m = nb * ho * wo
    if groups > 1 and a_codes.shape[1] == groups:
        return depthwise_conv(a_codes, w, geom)
    settings = dispatch.settings
    if settings.uses_amx(w, m, groups):
        nhwc = np.ascontiguousarray(a_codes.transpose(0, 2, 3, 1))
        out = conv_acc_channels_last(nhwc, w, geom, shift, settings=settings)
        return np.ascontiguousarray(out.reshape(nb, ho, wo, w.n).transpose(0, 3, 1, 2))
    mp, kp = activation_layout(w, m, groups, settings)
    a8 = np.zeros(groups * mp * kp, dtype=np.int8)
    asum = np.zeros(groups * mp, dtype=np.int64)
    _im2col(np.ascontiguousarray(a_codes), shift, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, mp, kp, a8, asum)
    out = scratch("conv.acc", (m, w.n), np.int32)
    run_core(a8, asum, w, shift, groups, m, mp, out, settings=settings)
    return np.ascontiguousarray(out.reshape(nb, ho, wo, w.n).transpose(0, 3, 1, 2))
