"""Quantized conv2d with channels-last float activations in and out (issue 15).

A lowered conv net passes activations between layers as torch tensors in ``channels_last``
memory format, i.e. NHWC arrays: ReLU, residual adds and max-pooling give the same values in
either layout, and every conv then reads and writes NHWC with no transposes (on a VNNI CPU
without AMX the NCHW <-> NHWC copies and the NCHW gather were over half of a ResNet's
forward). One conv runs as parallel Numba passes, as ONNX Runtime/MLAS feed their int8 convs
(``reference/quantization.md``, QLinearConv): NHWC in, 1x1 convs reading the input directly,
a channels-last im2col for k x k, a direct depthwise kernel.

* AVX-512 VNNI (no AMX) and AVX2, one group: an implicit GEMM. Floats are quantized once into a
  zero-padded NHWC buffer of shifted codes with per-pixel sums (``_pad_codes``), and
  ``gemm_vnni.conv_gemm`` (``gemm_avx2.conv_gemm``) reads every tap's activations from it directly and writes
  the dequantized floats itself: no im2col, no int32 intermediate, no scale pass.

Other paths (portable), small products and the AMX engine:

* 1x1, stride 1, no padding: the NHWC pixels *are* the GEMM's activation rows, so floats are
  quantized straight into the ``(pixels, k_pad)`` signed-byte rows with their row sums.
* k x k (and strided 1x1): floats are quantized once into NHWC codes, then each patch row is
  ``kh * kw`` runs of ``C`` contiguous bytes (``conv_simd._patches``; K ordered ``(kh, kw, c)``
  with the weight re-packed to match, ``conv_simd.taps_first``).
* the int32 ``(pixels, C_out)`` product is scaled (and biased) in one row pass: that *is* NHWC.
* depthwise: NHWC codes, one pass register-blocked over 16 channels of a pixel (``simd_dw``) that also
  runs the epilogue (scale, bias, clamp, or the next conv's codes) before its one store.

Same float formulas as ``quant`` (codes ``rint(clip(x / step))``, ``float32(acc) * scale + bias``)
and exact int32 products, so outputs are bit-identical to ``qconv2d``'s.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels import conv_amx, gemm_avx2, gemm_vnni
from bitmix.kernels.broadcast import NO_SCALE, quantize_rows
from bitmix.kernels.conv import _weight_codes, conv_acc_channels_last
from bitmix.kernels.conv_simd import _patches, _quantize_pixels, taps_first
from bitmix.kernels.isa import isa_of
from bitmix.kernels.launch import _parallel, activation_layout, run_core
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.padded import PaddedCodes
from bitmix.kernels.routing import dispatch
from bitmix.kernels.scratch import aligned_copy, aligned_empty, scratch
from bitmix.kernels.simd import add_i32x16, cache_variant, hsum_i32x16, zero_i32x16
from bitmix.kernels.simd_dw import LANES, acc_zero, mac, store_codes, store_floats

ROW_BLOCK = 64  # pixels per task of the row passes
_IMPLICIT_GEMM = {"avx512vnni": gemm_vnni, "avx2": gemm_avx2}  # micro-kernel set -> its implicit-GEMM conv


@njit(parallel=True, cache=True)
def _quantize_flat(x, step, lo, hi, out):
    """``out = rint(clip(x / step, lo, hi))`` over flat arrays in one pass (numpy needed five: 1.5 ms
    vs 0.1 ms on 1.2 M values); True if any NaN was seen."""
    flo = np.float32(lo)
    fhi = np.float32(hi)
    chunk = 4096
    blocks = (x.size + chunk - 1) // chunk
    nan = np.zeros(blocks, dtype=np.bool_)
    for t in prange(blocks):
        seen = False
        for i in range(t * chunk, min(x.size, t * chunk + chunk)):
            v = x[np.uintp(i)] / step
            seen |= v != v  # NaN codes are discarded
            out[np.uintp(i)] = np.rint(min(max(v, flo), fhi))
        nan[t] = seen
    return nan.any()


@njit(parallel=True, cache=True)
def _quantize_to_channels_last(x, step, lo, hi, out):
    """``out[b, h, w, c] = rint(clip(x[b, c, h, w] / step, lo, hi))``; True if any NaN was seen."""
    nb, c, h, w = x.shape
    flo = np.float32(lo)
    fhi = np.float32(hi)
    nan = np.zeros(nb * h, dtype=np.bool_)
    for t in prange(nb * h):
        b = t // h
        r = t - b * h
        for ci in range(c):
            for wi in range(w):
                v = x[b, ci, r, wi] / step
                if v != v:
                    nan[t] = True
                    v = np.float32(0)
                out[b, r, wi, ci] = np.rint(min(max(v, flo), fhi))
    return nan.any()


@njit(inline="always")
def _code(v, flo, fhi, sh):
    return np.int32(np.rint(min(max(v, flo), fhi))) - sh


@njit(inline="always")
def _code_row(xf, s0, w, step, flo, fhi, sh, codes):
    """``codes[:w]`` = the codes of ``xf[s0:s0+w]`` (one channel's row of an NCHW input); True if one is NaN."""
    seen = False
    for iw in range(w):
        v = xf[np.uintp(s0 + iw)] / step
        seen |= v != v
        codes[iw] = _code(v, flo, fhi, sh)
    return seen


@njit(inline="always")
def _byte_sum(of, d, c):
    """``sum(of[d:d+c])`` of int8 codes, added in int32: numba types ``s += np.int32(..)`` as int64, so LLVM
    widened every byte to 64 bits (4 per ymm add); kept in int32 the loop adds 8 a ymm, twice as fast
    (a 56x56x256 buffer's pixel sums on one thread: 49 -> 26 us)."""
    s = np.int32(0)
    for q in range(c):
        s = np.int32(s + np.int32(of[np.uintp(d + q)]))
    return s


@njit(parallel=True, cache=True)
def _pad_codes(x, channels_last, step, lo, hi, shift, ph, pw, out, psum):
    """Padded NHWC shifted codes for the implicit GEMM (``gemm_vnni.conv_gemm``): ``out[b, ph + ih, pw + iw,
    q] = rint(clip(x / step, lo, hi)) - shift``, border pixels ``-shift`` (the code 0 the reference
    pads with), channels past C 0; ``psum`` = each padded pixel's sum over C. One task per padded
    row; True if any NaN was seen (NaN codes are discarded)."""
    if channels_last:
        nb, h, w, c = x.shape
    else:
        nb, c, h, w = x.shape
    _, hp, wp, c4 = out.shape
    xf = x.reshape(-1)
    of = out.reshape(-1)
    flo = np.float32(lo)
    fhi = np.float32(hi)
    sh = np.int32(shift)
    # 4-byte pixels (c4 == 4) as int32, little-endian (every CPU bitmix runs on): channel q is byte q. Stored
    # byte by byte, an NCHW image's 3 channels took 106 us to interleave and quantize at 224x224, 80 as one store
    o32 = of.view(np.int32)
    nan = np.zeros(nb * hp, dtype=np.bool_)
    for t in prange(nb * hp):
        b = t // hp
        ih = t - b * hp - ph
        row = t * wp * c4
        inside = 0 <= ih < h
        for pj in range(wp):  # border pixels
            if inside and pw <= pj < pw + w:
                continue
            d = row + pj * c4
            for q in range(c):
                of[np.uintp(d + q)] = -sh
            for q in range(c, c4):
                of[np.uintp(d + q)] = 0
            psum[t * wp + pj] = -sh * c
        if not inside:
            continue
        seen = False
        d0 = row + pw * c4
        if not channels_last and c4 == 4:  # an image's 1-4 channels: each row's pixels as one int32 store each
            quads = np.zeros((4, w), dtype=np.int32)
            for q in range(c):
                seen |= _code_row(xf, ((b * c + q) * h + ih) * w, w, step, flo, fhi, sh, quads[q])
            p0 = t * wp + pw
            for iw in range(w):
                a0, a1, a2, a3 = quads[0, iw], quads[1, iw], quads[2, iw], quads[3, iw]
                o32[np.uintp(p0 + iw)] = np.int32((a0 & 0xFF) | ((a1 & 0xFF) << 8) | ((a2 & 0xFF) << 16)
                                                  | ((a3 & 0xFF) << 24))
                psum[p0 + iw] = a0 + a1 + a2 + a3
            nan[t] = seen
            continue
        if not channels_last:  # NCHW: each channel's row quantized contiguously, then interleaved
            codes = np.empty(w, dtype=np.int32)
            sums = np.zeros(w, dtype=np.int32)
            for q in range(c):
                seen |= _code_row(xf, ((b * c + q) * h + ih) * w, w, step, flo, fhi, sh, codes)
                for iw in range(w):
                    of[np.uintp(d0 + iw * c4 + q)] = codes[iw]
                    sums[iw] += codes[iw]
            for q in range(c, c4):
                for iw in range(w):
                    of[np.uintp(d0 + iw * c4 + q)] = 0
            for iw in range(w):
                psum[t * wp + pw + iw] = sums[iw]
            nan[t] = seen
            continue
        if c == c4:  # the row's interior is one contiguous run
            s0 = (b * h + ih) * w * c
            for q in range(w * c):
                v = xf[np.uintp(s0 + q)] / step
                seen |= v != v
                of[np.uintp(d0 + q)] = _code(v, flo, fhi, sh)
        else:
            for iw in range(w):
                s0 = ((b * h + ih) * w + iw) * c
                for q in range(c):
                    v = xf[np.uintp(s0 + q)] / step
                    seen |= v != v
                    of[np.uintp(d0 + iw * c4 + q)] = _code(v, flo, fhi, sh)
                for q in range(c, c4):
                    of[np.uintp(d0 + iw * c4 + q)] = 0
        nan[t] = seen
        for pj in range(pw, pw + w):
            psum[t * wp + pj] = _byte_sum(of, row + pj * c4, c)
    return nan.any()


@njit(parallel=True, cache=True)
def _scale_rows(acc, scale, bias, has_bias, out):
    """``out[i, c] = float32(acc[i, c]) * scale[c] (+ bias[c])``, ``ROW_BLOCK`` rows per task."""
    m, n = out.shape
    blocks = (m + ROW_BLOCK - 1) // ROW_BLOCK
    for t in prange(blocks):
        for i in range(t * ROW_BLOCK, min(m, t * ROW_BLOCK + ROW_BLOCK)):
            src = acc[i]
            dst = out[i]
            if has_bias:
                for c in range(n):
                    dst[np.uintp(c)] = np.float32(src[np.uintp(c)]) * scale[np.uintp(c)] + bias[np.uintp(c)]
            else:
                for c in range(n):
                    dst[np.uintp(c)] = np.float32(src[np.uintp(c)]) * scale[np.uintp(c)]


@njit(inline="always")
def _taps3x3(xf, p, dc, dr, taps, t):
    """The 9 taps of a 3x3 window at ``xf[p]`` (``dc``, ``dr``: a column's and a row's step) against 16
    block-major weights from ``taps[t]``: 9 vector steps whose addresses are base + step (* 2)."""
    acc = acc_zero(taps)
    for _ in range(3):
        acc = mac(acc, xf, p, taps, t)
        acc = mac(acc, xf, p + dc, taps, t + LANES)
        acc = mac(acc, xf, p + 2 * dc, taps, t + 2 * LANES)
        p += dr
        t += 3 * LANES
    return acc


@njit(inline="always")
def _block_sum(xf, p, c0, inner, dc, dr, taps, src, wof, n, nt):
    """The tap sums of 16 channels from ``c0`` of one output pixel: 9 fixed steps when its 3x3 window lies wholly
    inside the input (``inner``, at ``xf[p]``), else its ``n`` in-bounds taps listed in ``src`` / ``wof``."""
    if inner:
        return _taps3x3(xf, p + c0, dc, dr, taps, c0 * 9)
    acc = acc_zero(taps)
    for k in range(n):
        acc = mac(acc, xf, src[k] + c0, taps, c0 * nt + wof[k])
    return acc


@njit(inline="always")
def _tail_sum(xf, taps, ch, c16, nt, b, h, w, c, kh, kw, top, left, dh, dw):
    """The exact tap sum of one output pixel's channel `ch` past the last whole 16-channel block (scalar code);
    the window's top-left input pixel is (`top`, `left`)."""
    a = np.int32(0)
    for i in range(kh):
        for j in range(kw):
            ih, iw = top + i * dh, left + j * dw
            if 0 <= ih < h and 0 <= iw < w:
                tap = taps[c16 * nt + (i * kw + j) * LANES + ch - c16]
                a += np.int32(xf[((b * h + ih) * w + iw) * c + ch]) * np.int32(tap)
    return a


@njit(parallel=True, cache=True)
def _depthwise(x, taps, scale, bias, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, lo, hi, out, to_codes, q, qpad, out8,
               psum):
    """``out[pixel, c] = clamp(float32(sum_ij x[b, ih, iw, c] * w[ij, c]) * scale[c] + bias[c], lo, hi)`` (the
    clamp as ``gemm_vnni.store_epilogue``'s: NaN and -0.0 kept; -0.0 biases for none). With ``to_codes`` those
    floats are instead quantized as the next conv's ``_pad_codes`` would (``q``: its step, code bounds with the
    clamp folded in and shift, ``gemm_avx2.codes_bounds``; ``qpad`` its padding) into the interior of its padded
    buffer ``out8``, with per-pixel sums ``psum``. ``taps``: ``_depthwise_taps``' block-major weights.

    Register-blocked (``simd_dw``): per output pixel and 16 channels the taps sum in one vector (in ``taps``'
    dtype: int16 where every sum fits) and the epilogue runs on it before one store. A row buffer per tap,
    then an epilogue pass over it, took 513 us at 56x56x144 writing codes (one thread), this 255 us.
    3x3 windows wholly inside the input take ``_taps3x3``; other pixels (borders, other kernel sizes) loop
    over a list of their in-bounds taps; channels past the last 16 take the same formulas in scalar code.
    One task per output row."""
    nb, h, w, c = x.shape
    xf = x.reshape(-1)
    c16 = c - c % LANES
    nt = kh * kw
    _, hp, wp, c4 = out8.shape
    of = out8.reshape(-1)
    step, qlo, qhi, qsh = q[0], q[1], q[2], np.int32(q[3])
    for t in prange(nb * ho):
        b = t // ho
        oh = t - b * ho
        src = np.empty(nt, dtype=np.int64)
        wof = np.empty(nt, dtype=np.int64)
        top = oh * sh - ph
        in0, in1 = 0, wo  # outputs whose every column tap is in bounds
        for j in range(kw):
            off = j * dw - pw
            in0 = max(in0, (sw - 1 - off) // sw)
            in1 = min(in1, (w - 1 - off) // sw + 1)
        if not (kh == kw == 3 and top >= 0 and top + 2 * dh < h):
            in1 = in0  # no pixel of this row takes ``_taps3x3``
        pix = (b * hp + oh + qpad[0]) * wp + qpad[1]
        for ow in range(wo):
            inner = in0 <= ow < in1
            p = ((b * h + top) * w + ow * sw - pw) * c
            n = 0
            if not inner:  # list this pixel's in-bounds taps
                for i in range(kh):
                    ih = top + i * dh
                    if 0 <= ih < h:
                        for j in range(kw):
                            iw = ow * sw - pw + j * dw
                            if 0 <= iw < w:
                                src[n] = ((b * h + ih) * w + iw) * c
                                wof[n] = (i * kw + j) * LANES
                                n += 1
            if to_codes:
                d = (pix + ow) * c4
                sums = zero_i32x16()
                for c0 in range(0, c16, LANES):
                    acc = _block_sum(xf, p, c0, inner, dw * c, dh * w * c, taps, src, wof, n, nt)
                    sums = add_i32x16(sums, store_codes(of, d + c0, acc, scale, bias, c0, step, qlo, qhi, qsh))
                s = np.int32(hsum_i32x16(sums)) - qsh * c16
                for ch in range(c16, c):
                    a = _tail_sum(xf, taps, ch, c16, nt, b, h, w, c, kh, kw, top, ow * sw - pw, dh, dw)
                    code = _code((np.float32(a) * scale[ch] + bias[ch]) / step, qlo, qhi, qsh)
                    of[d + ch] = code
                    s += code
                for ch in range(c, c4):
                    of[d + ch] = 0
                psum[pix + ow] = s
            else:
                d = (t * wo + ow) * c
                for c0 in range(0, c16, LANES):
                    acc = _block_sum(xf, p, c0, inner, dw * c, dh * w * c, taps, src, wof, n, nt)
                    store_floats(out, d + c0, acc, scale, bias, c0, lo, hi)
                for ch in range(c16, c):
                    a = _tail_sum(xf, taps, ch, c16, nt, b, h, w, c, kh, kw, top, ow * sw - pw, dh, dw)
                    v = np.float32(a) * scale[ch] + bias[ch]
                    v = lo if v < lo else v
                    out[d + ch] = hi if v > hi else v


_TAPS: weakref.WeakKeyDictionary[PackedWeight, dict] = weakref.WeakKeyDictionary()


def _depthwise_taps(w: PackedWeight, code_max: int) -> np.ndarray:
    """The weight codes of a depthwise conv block-major for ``_depthwise``, cached per weight: flat
    ``(ceil(C / 16), kh * kw, 16)``, channels past C zero. int16 when every channel's ``sum |w| * code_max``
    (``code_max``: the largest activation code magnitude) fits in int16, so the int16 sums are exact, else
    int32."""
    cache = _TAPS.setdefault(w, {})
    hit = cache.get(code_max)
    if hit is None:
        codes = _weight_codes(w).astype(np.int32)  # (C, kh * kw)
        narrow = int(np.abs(codes).sum(axis=1).max()) * code_max <= np.iinfo(np.int16).max
        blocks = np.zeros((-(-codes.shape[0] // LANES) * LANES, codes.shape[1]), dtype=np.int16 if narrow else np.int32)
        blocks[: codes.shape[0]] = codes
        hit = cache[code_max] = aligned_copy(blocks.reshape(-1, LANES, codes.shape[1]).transpose(0, 2, 1)).reshape(-1)
    return hit


@functools.lru_cache(maxsize=1024)
def _quant_args(clamp: tuple, nxt: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``_depthwise``'s ``q`` and ``qpad`` for the next conv's ``nxt = (step, lo, hi, shift, ph, pw)`` after a
    ``clamp``, once per pair (``codes_bounds`` took 10 us a call)."""
    return gemm_avx2.codes_bounds(clamp, nxt[:4]), np.array(nxt[4:], dtype=np.int64)


NO_QUANT = (np.ones(4, dtype=np.float32), np.zeros(2, dtype=np.int64))  # ``_depthwise``'s q, qpad for floats
NO_CODES = np.zeros((1, 1, 1, 4), dtype=np.int8)
NO_SUMS = np.zeros(1, dtype=np.int64)
NO_OUT = np.zeros((1, 1), dtype=np.float32)  # ... and its float output when it writes codes


def implicit_route(w: PackedWeight, m: int, geom: tuple[int, ...]):
    """The implicit-GEMM module (``gemm_vnni``/``gemm_avx2``/``conv_amx``) a one-group conv with ``m`` output
    pixels runs on under the current dispatch settings, or None (portable, too few rows). On ``avx512amx``
    stride-1 convs with whole tile rows of channels go to the tile engine on their codes (``conv_amx``), the
    rest to vpdpbusd: the engine behind an im2col and float passes measured 2.2-7.9x slower on every resnet50
    conv (Sapphire Rapids, 2 threads, 2026-12-05; resnet18 forward 33.7 -> 14.4 ms)."""
    settings = dispatch.settings
    if (settings.uses_amx(w, m, 1) and m * w.n * w.k >= settings.amx_conv_min_macs
            and conv_amx.takes(w, w.k // (geom[0] * geom[1]), geom)):
        return conv_amx
    implicit = _IMPLICIT_GEMM.get(isa_of(settings.path))
    return implicit if implicit is not None and m >= implicit.MIN_M else None


@dataclass(frozen=True, eq=False)
class ImplicitConv:
    """A one-group conv at one input shape on the implicit GEMM with every constant bound
    (``implicit_conv``): a call is the float -> code pass and the GEMM with its epilogue.
    ``PreparedConv`` keeps one per shape, so a compiled model's call skips rebuilding them."""

    channels_last: bool
    pad_args: tuple  # ``_pad_codes``' (step, lo, hi, shift, ph, pw)
    padded: tuple[int, int, int, int]  # the padded code buffer (B, Hp, Wp, c4)
    channels: int  # C of the input
    out_shape: tuple[int, int, int, int]  # NHWC
    gemm: Callable  # adds the residual and clamps in its epilogue
    engine: ModuleType  # ``gemm_vnni`` or ``gemm_avx2``: its ``conv_codes_gemm`` is ``codes_conv``'s kernel

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return self.on_codes(*self.pad(x), residual)

    def pad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x``'s padded codes and per-pixel sums (``_pad_codes``), in this thread's scratch buffers."""
        nb, hp, wp, _ = self.padded
        a8 = scratch("conv.padded", self.padded, np.int8)
        psum = scratch("conv.psum", nb * hp * wp, np.int64)
        if _pad_codes(x, self.channels_last, *self.pad_args, a8, psum):
            raise _nan()
        return a8, psum

    def on_codes(self, a8: np.ndarray, psum: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
        """The conv of input codes already padded (``a8``, sums ``psum``), then the epilogue."""
        y = aligned_empty(self.out_shape, np.float32)
        self.gemm(a8.reshape(-1), psum, y, residual)
        return y


def implicit_conv(implicit, x_shape: tuple[int, ...], channels_last: bool, w: PackedWeight, geom: tuple[int, ...],
                  step: np.float32, lo: int, hi: int, shift: int, scale: np.ndarray, bias: np.ndarray | None,
                  residual: bool, clamp: tuple) -> ImplicitConv:
    """``conv_nhwc``'s implicit-GEMM route (``implicit`` = ``implicit_route``'s module) for inputs of
    ``x_shape``, bound once; ``residual``: calls pass one."""
    _, _, sh, sw, ph, pw, _, _, _, ho, wo = geom
    nb, h, wd, c = x_shape if channels_last else (x_shape[0], x_shape[2], x_shape[3], x_shape[1])
    hp, wp, c4 = h + 2 * ph, wd + 2 * pw, -(-c // 4) * 4
    m = nb * ho * wo
    parallel = _parallel(dispatch.settings, m * w.n * w.k)
    gemm = implicit.conv_gemm(w, shift, c, geom, hp, wp, m, scale, bias, residual, clamp, parallel,
                              a_max=gemm_avx2.byte_bound(lo, hi, shift))
    return ImplicitConv(channels_last, (step, lo, hi, shift, ph, pw), (nb, hp, wp, c4), c, (nb, ho, wo, w.n), gemm,
                        implicit)


def _code_borders(a8, psum, ph, pw, h, w, c, shift, sums):
    """Complete a padded code buffer whose interior pixels' first ``c`` channels a GEMM epilogue wrote
    (``gemm_vnni.CODES``) into ``_pad_codes``' layout: border pixels code 0 (``-shift``), channels past
    ``c`` zero, with ``sums`` ``psum`` each pixel's sum over ``c`` (``conv_amx`` reads none). One task per
    padded row (``_code_borders_parallel``) or one loop (``_code_borders_serial``: ``BORDERS_SERIAL_MAX``)."""
    nb, hp, wp, c4 = a8.shape
    of = a8.reshape(-1)
    sh = np.int32(shift)
    for t in prange(nb * hp):
        ih = t - (t // hp) * hp - ph
        inside = 0 <= ih < h
        for pj in range(wp):
            d = (t * wp + pj) * c4
            if inside and pw <= pj < pw + w:
                if sums:
                    psum[t * wp + pj] = _byte_sum(of, d, c)
            else:
                for q in range(c):
                    of[np.uintp(d + q)] = -sh
                if sums:
                    psum[t * wp + pj] = -sh * c
            for q in range(c, c4):
                of[np.uintp(d + q)] = 0


_code_borders_parallel = njit(parallel=True, cache=True)(cache_variant(_code_borders, "parallel"))
_code_borders_serial = njit(cache=True)(cache_variant(_code_borders, "serial"))
# Code bytes (interior pixels x channels) up to which one thread completes a buffer: a parallel launch costs more
# than it splits below it (Sapphire Rapids, 2 threads, 2026-12-08, after a torch op: 7x7x512 20 -> 1.2 us,
# 14x14x1024 37 -> 7 us, 56x56x64 14 -> 11 us; 28x28x512 and up are faster split).
BORDERS_SERIAL_MAX = 1 << 18


@dataclass(frozen=True, eq=False)
class CodesConv:
    """A one-group conv on VNNI or AVX2 whose results go straight into the next conv's padded input codes
    (``conv_codes_gemm``; ``PreparedConv.to_codes``): the floats are never stored, and the next
    conv skips its float -> code pass. The codes sit in the next conv's buffer (`_input_codes`), valid until
    the next call into it on this thread."""

    own: ImplicitConv  # this conv's launch (its input's code pass)
    gemm: Callable
    padded: tuple[int, int, int, int]  # the next conv's padded buffer (B, Hp, Wp, c4)
    borders: tuple[int, int, int, int, int, int] | None  # (ph, pw, Ho, Wo, C_out, shift): ``_code_borders``;
    # None: the next conv is depthwise, whose input is the bare NHWC codes (``depthwise_input``)
    owner: object  # the next conv
    sums: bool  # the next conv reads per-pixel sums (not on ``conv_amx``)

    def __call__(self, x: np.ndarray | PaddedCodes) -> PaddedCodes:
        a8, psum = (x.a8, x.psum) if isinstance(x, PaddedCodes) else self.own.pad(x)
        out = _input_codes(self.owner, self.padded, self.borders is not None and self.sums)
        self.gemm(a8.reshape(-1), psum, out[0].reshape(-1))
        return self.complete(out)

    def complete(self, out: tuple[np.ndarray, np.ndarray]) -> PaddedCodes:
        """The next conv's input: the codes the GEMM wrote in ``out`` (codes, sums), their borders filled."""
        nb, hp, wp, c4 = self.padded
        if self.borders is None:
            return PaddedCodes(out[0], out[1], (nb, c4, hp, wp), self.owner)
        ph, pw, ho, wo, n, _ = self.borders
        if self.sums or ph or pw or c4 != n:  # else every byte is the GEMM's: nothing to complete
            forced = dispatch.settings.serial
            serial = not self.sums or (nb * ho * wo * n <= BORDERS_SERIAL_MAX if forced is None else forced)
            (_code_borders_serial if serial else _code_borders_parallel)(out[0], out[1], *self.borders, self.sums)
        return PaddedCodes(out[0], out[1], (nb, n, ho, wo), self.owner)


@dataclass(frozen=True, eq=False)
class FloatsAndCodesConv(CodesConv):
    """``CodesConv`` for a result that other ops read too (``layout.code_chains``: a ResNet block's output is the
    next block's input and its residual): one epilogue stores the floats (residual added, clamped) and the next
    conv's codes of them (``conv_both_gemm``), so the next conv skips its float -> code pass over them. A call
    returns ``(floats, codes)``, or ``(floats, None)`` when a float is NaN: the next conv then gets the floats
    and reports it, as it would have without the hand-off."""

    def __call__(self, x: np.ndarray | PaddedCodes, residual: np.ndarray | None = None
                 ) -> tuple[np.ndarray, PaddedCodes | None]:
        a8, psum = (x.a8, x.psum) if isinstance(x, PaddedCodes) else self.own.pad(x)
        out = _input_codes(self.owner, self.padded, self.sums)
        y = aligned_empty(self.own.out_shape, np.float32)
        nan = np.zeros(1, dtype=np.int32)
        self.gemm(a8.reshape(-1), psum, y, residual, out[0].reshape(-1), nan)
        return y, None if nan[0] else self.complete(out)


_INPUT_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # next conv -> its per-thread input buffers
_INPUT_CODES_LOCK = threading.Lock()


def _input_codes(owner: object, padded: tuple[int, int, int, int], sums: bool) -> tuple[np.ndarray, np.ndarray]:
    """The next conv's padded input codes (and per-pixel sums) for this call: one buffer per consumer conv
    and thread, grown to the largest batch served and shared by every input shape. One buffer per shape
    held the sum of all shapes ever served (a CNN served at batches 1..64: 585 MiB against 37 at 64 alone);
    the codes live only until the consumer reads them, within one forward of one thread."""
    with _INPUT_CODES_LOCK:
        local = _INPUT_CODES.get(owner)
        if local is None:
            local = _INPUT_CODES[owner] = threading.local()
    nb, hp, wp, c4 = padded
    pixels = nb * hp * wp
    a8 = getattr(local, "a8", None)
    if a8 is None or a8.size < pixels * c4:
        a8 = local.a8 = aligned_empty(pixels * c4, np.int8)
    if not sums:
        return a8[: pixels * c4].reshape(padded), NO_SUMS
    psum = getattr(local, "psum", None)
    if psum is None or psum.size < pixels:
        psum = local.psum = np.empty(pixels, dtype=np.int64)
    return a8[: pixels * c4].reshape(padded), psum[:pixels]


def codes_conv(own: ImplicitConv, w: PackedWeight, geom: tuple[int, ...], scale: np.ndarray, bias: np.ndarray | None,
               clamp: tuple, nxt: tuple, owner: object, depthwise: bool = False, sums: bool = True,
               floats: bool = False, residual: bool = False) -> CodesConv:
    """``own``'s conv writing codes for the next conv ``owner``: ``nxt`` = its ``(step, lo, hi, shift, ph, pw)``;
    a ``depthwise`` one reads bare NHWC codes (``depthwise_input``: no padding, shift or sums; ``nxt``'s
    shift and padding 0); ``sums``: the next conv reads per-pixel sums (its route is not ``conv_amx``).
    ``floats``: the floats too (``FloatsAndCodesConv``; not for a depthwise next conv, and only on engines with a
    ``conv_both_gemm``: VNNI and AMX), ``residual``: calls pass one."""
    nb, hp, wp, _ = own.padded
    ho, wo = geom[9], geom[10]
    step, qlo, qhi, qshift, qph, qpw = nxt
    padded = (nb, ho + 2 * qph, wo + 2 * qpw, w.n if depthwise else -(-w.n // 4) * 4)
    m = nb * ho * wo
    _, lo, hi, shift = own.pad_args[:4]
    args = (w, shift, own.channels, geom, hp, wp, m, scale, bias)
    launch = (_parallel(dispatch.settings, m * w.n * w.k), padded, (qph, qpw), (step, qlo, qhi, qshift))
    borders = None if depthwise else (qph, qpw, ho, wo, w.n, qshift)
    if floats:
        assert not depthwise
        gemm = own.engine.conv_both_gemm(*args, residual, clamp, *launch, a_max=gemm_avx2.byte_bound(lo, hi, shift))
        return FloatsAndCodesConv(own, gemm, padded, borders, owner, sums)
    known = {"code_max": max(-lo, hi)} if own.engine is gemm_avx2 else {}  # its input codes' bound
    gemm = own.engine.conv_codes_gemm(*args, clamp, *launch, a_max=gemm_avx2.byte_bound(lo, hi, shift), **known)
    return CodesConv(own, gemm, padded, borders, owner, sums)


def _nan() -> BitmixError:
    return BitmixError("x: contains NaN; cannot quantize")


def _codes(x: np.ndarray, channels_last: bool, step: np.float32, lo: int, hi: int) -> np.ndarray:
    """NHWC codes of ``x`` (NHWC, or NCHW when not ``channels_last``) in this thread's scratch buffer."""
    shape = x.shape if channels_last else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    codes = scratch("conv.codes", shape, np.int8 if lo < 0 else np.uint8)
    nan = (_quantize_flat(x.reshape(-1), step, lo, hi, codes.reshape(-1)) if channels_last
           else _quantize_to_channels_last(x, step, lo, hi, codes))
    if nan:
        raise _nan()
    return codes


@njit(parallel=True, cache=True)
def _residual_clamp(y, res, has_res, lo, hi):
    """``y = clamp(y (+ res), lo, hi)`` over flat float32 arrays, the clamp as two selects that keep NaN and
    -0.0 (``gemm_vnni.store_epilogue``'s), ``ROW_BLOCK * 64`` values per task."""
    chunk = ROW_BLOCK * 64
    for t in prange((y.size + chunk - 1) // chunk):
        if has_res:
            for i in range(t * chunk, min(y.size, t * chunk + chunk)):
                v = y[i] + res[i]
                v = lo if v < lo else v
                y[i] = hi if v > hi else v
        else:
            for i in range(t * chunk, min(y.size, t * chunk + chunk)):
                v = y[i]
                v = lo if v < lo else v
                y[i] = hi if v > hi else v


def _finish(y: np.ndarray, residual: np.ndarray | None, clamp: tuple) -> np.ndarray:
    """``clamp(y + residual, lo, hi)`` in place, the fused epilogue's float ops for the paths that do not
    fuse it. One branch-free pass: numpy's ``copyto(y, lo, where=y < lo)`` mispredicted a branch per
    element (1.7 ms on a 56x56x64 ReLU output, 0.03 ms on an all-positive mask)."""
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])
    if residual is None and lo == -np.inf and hi == np.inf:
        return y
    res = NO_OUT.reshape(-1) if residual is None else np.ascontiguousarray(residual, dtype=np.float32).reshape(-1)
    _residual_clamp(y.reshape(-1), res, residual is not None, lo, hi)
    return y


def conv_nhwc(x: np.ndarray, w: PackedWeight, geom: tuple[int, ...], step: np.float32, lo: int, hi: int,
              shift: int, scale: np.ndarray, bias: np.ndarray | None, channels_last: bool = True,
              residual: np.ndarray | None = None, clamp: tuple = gemm_vnni.NO_CLAMP) -> np.ndarray:
    """float32 ``(B, Ho, Wo, C_out)`` of a conv of C-contiguous float32 ``x`` (NHWC, or NCHW when not
    ``channels_last``) with one group, or one input and one output channel per group (depthwise);
    ``geom`` from ``conv.conv_geometry``, ``scale`` = ``a_step * w_scales``. Optionally the layers
    after it: ``+ residual`` (C-contiguous float32 ``(B, Ho, Wo, C_out)``), then clamped to
    ``clamp`` = float32 ``(lo, hi)`` (ReLU: ``(0, inf)``), in the kernel's epilogue where it has one."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo = geom
    nb, h, wd, c = x.shape if channels_last else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    m = nb * ho * wo
    implicit = implicit_route(w, m, geom) if groups == 1 else None
    if implicit is not None:
        return implicit_conv(implicit, x.shape, channels_last, w, geom, step, lo, hi, shift, scale, bias,
                             residual is not None, clamp)(x, residual)
    if groups > 1:
        if not (groups == c == w.n):
            raise BitmixError(f"groups={groups}: the NHWC route takes one group or depthwise convs")
        return depthwise(_codes(x, channels_last, step, lo, hi), w, geom, lo, hi, scale, bias, residual, clamp)
    y = aligned_empty((nb, ho, wo, w.n), np.float32)
    has_bias = bias is not None
    b_arg = bias if bias is not None else scale
    settings = dispatch.settings
    if settings.uses_amx(w, m, 1):
        acc = conv_acc_channels_last(_codes(x, channels_last, step, lo, hi), w, geom, shift, settings=settings)
    else:
        mp, kp = activation_layout(w, m, 1, settings)
        a8 = scratch("conv.a8", mp * kp, np.int8)
        asum = scratch("conv.asum", mp, np.int64)
        if kh == kw == sh == sw == 1 and ph == pw == 0:
            nan = (quantize_rows(True)(x.reshape(m, c), NO_SCALE, False, step, lo, hi, shift, kp, a8, asum)
                   if channels_last
                   else _quantize_pixels(x.reshape(nb, c, h * wd), step, lo, hi, shift, kp, a8, asum))
            if nan:
                raise _nan()
        else:
            _patches(_codes(x, channels_last, step, lo, hi), shift, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, kp,
                     a8, asum)
        if mp > m:
            a8[m * kp :] = 0
            asum[m:] = 0
        acc = scratch("conv.acc", (m, w.n), np.int32)
        run_core(a8, asum, taps_first(w, c, kh, kw), shift, 1, m, mp, acc, settings=settings)
    _scale_rows(acc, scale, b_arg, has_bias, y.reshape(m, w.n))
    return _finish(y, residual, clamp)


def _fill_border(a8: np.ndarray, psum: np.ndarray, ph: int, pw: int, c: int, shift: int) -> None:
    """The padding pixels of a padded code buffer, as ``_pad_codes`` writes them: code 0 (``-shift``)."""
    nb, hp, wp, _ = a8.shape
    sums = psum.reshape(nb, hp, wp)
    for rows, cols in ((slice(0, ph), slice(None)), (slice(hp - ph, hp), slice(None)),
                       (slice(None), slice(0, pw)), (slice(None), slice(wp - pw, wp))):
        a8[:, rows, cols, :c] = -shift
        a8[:, rows, cols, c:] = 0
        sums[:, rows, cols] = -shift * c


def depthwise_input(x: np.ndarray | PaddedCodes, channels_last: bool, step: np.float32, lo: int,
                    hi: int) -> np.ndarray:
    """A depthwise conv's NHWC input codes (``_codes``' array: uint8 for an unsigned spec): quantized from
    floats ``x``, or the codes a previous conv's epilogue wrote for it (``CodesConv``, unpadded, unshifted)."""
    if isinstance(x, PaddedCodes):
        return x.a8.view(np.uint8) if lo >= 0 else x.a8
    return _codes(x, channels_last, step, lo, hi)


def depthwise(codes: np.ndarray, w: PackedWeight, geom: tuple[int, ...], lo: int, hi: int, scale: np.ndarray,
              bias: np.ndarray | None, residual: np.ndarray | None, clamp: tuple) -> np.ndarray:
    """float32 ``(B, Ho, Wo, C)`` of a depthwise conv of NHWC ``codes`` (``depthwise_input``; ``lo, hi`` its
    code range), ``+ residual``, clamped to ``clamp``."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, ho, wo = geom
    y = aligned_empty((codes.shape[0], ho, wo, w.n), np.float32)
    fused = clamp if residual is None else gemm_vnni.NO_CLAMP  # a residual comes before the clamp
    _depthwise(codes, _depthwise_taps(w, max(-lo, hi)), scale, gemm_avx2.no_bias(w.n) if bias is None else bias,
               kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, np.float32(fused[0]), np.float32(fused[1]), y.reshape(-1), False,
               *NO_QUANT, NO_CODES, NO_SUMS)
    return y if residual is None else _finish(y, residual, clamp)


def depthwise_to_codes(codes: np.ndarray, w: PackedWeight, geom: tuple[int, ...], lo: int, hi: int,
                       scale: np.ndarray, bias: np.ndarray | None, clamp: tuple, nxt: tuple,
                       owner: object) -> PaddedCodes:
    """``depthwise`` (no residual) whose output goes straight into the next conv's padded codes: ``nxt`` =
    that conv's ``(step, lo, hi, shift, ph, pw)`` (its ``_pad_codes`` arguments), ``owner`` that conv. The
    floats are never stored; the codes equal ``_pad_codes``' on them, provided they hold no NaN (finite
    ``scale`` and ``bias``: the caller checks)."""
    kh, kw, sh, sw, ph, pw, dh, dw, _, ho, wo = geom
    nb, n = codes.shape[0], w.n
    qph, qpw, qshift = int(nxt[4]), int(nxt[5]), int(nxt[3])
    a8 = aligned_empty((nb, ho + 2 * qph, wo + 2 * qpw, -(-n // 4) * 4), np.int8)  # the next conv's input
    psum = np.empty(a8.shape[0] * a8.shape[1] * a8.shape[2], dtype=np.int64)
    if qph or qpw:
        _fill_border(a8, psum, qph, qpw, n, qshift)
    _depthwise(codes, _depthwise_taps(w, max(-lo, hi)), scale, gemm_avx2.no_bias(n) if bias is None else bias,
               kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, np.float32(clamp[0]), np.float32(clamp[1]), NO_OUT.reshape(-1),
               True, *_quant_args(tuple(clamp), tuple(nxt)), a8, psum)
    return PaddedCodes(a8, psum, (nb, n, ho, wo), owner)
