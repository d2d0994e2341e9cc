"""Register-blocked AVX2 GEMM and implicit-GEMM conv for 4 or more activation rows (issue 15).

The AVX2 counterpart of ``gemm_vnni``, with the same weight layout, activation buffers and
exact result, so the callers (``conv_nhwc``, ``launch``, ``linear``) only choose the module.
Weights are re-laid once per layer as ``[n/16][k/4][16][4]`` unsigned bytes ``u = code + offset``
(the packed layout's offset for 2/4-bit, 128 for 8-bit); the four activation bytes of a K step
are broadcast (``vpbroadcastd``) and a 4-row x 16-channel tile accumulates in 8 ymm registers,
as ONNX Runtime's ``MlasConvSymKernelAvx2`` does (``reference/quantization.md`` section 6:
4 outputs x 16 channels, ``vpmaddubsw`` + ``vpmaddwd`` with ones + ``vpaddd``). AVX2 has 16 ymm
registers, so the tile is a quarter of the VNNI one (4 rows x 64 channels in 16 zmm).

``vpmaddubsw`` (u8 x s8, adjacent pairs summed to s16) *saturates*, so exactness needs a bound
on every s16 it produces. The activations are signed bytes, ``|a8| <= 128``:

* 2/4-bit weights: ``u <= 15``, so a pair is at most ``2 * 15 * 128 = 3840`` in magnitude. Two
  K steps are summed in s16 before the ``vpmaddwd`` (``7680 < 32767``), which saves a third of
  the multiplies.
* 8-bit weights: ``u <= 255`` and a pair can reach ``2 * 255 * 128 = 65280``, which saturates.
  Each byte is split into nibbles, ``u = 16 * h + l`` with ``h, l <= 15``: ``vpmaddubsw`` on ``h``
  and on ``l`` stays within 3840, and ``vpmaddwd`` widens ``h``'s pairs with weight 16 and ``l``'s
  with weight 1, exactly, to s32.

The result is ``dot(u, a8) - offset * asum + shift * row_sums``; every s32 lane stays below
2^31 because ``k_pad <= tiling.MAX_K_PAD`` (65536 * 255 * 128 < 2^31). Convolutions run as
an implicit GEMM over a zero-padded NHWC code buffer, exactly as in ``gemm_vnni`` (see there);
the epilogue stores the int32 or ``float32(acc) * scale (+ bias)`` (``quant``'s formula).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.simd import add_i16x16, add_i32x8, load_i8x32, madd_ones, maddubs, unpack_i8x32, zero_i32x8
from bitmix.kernels.simd_avx2 import (
    bcast4_i8x32,
    load_i32x8,
    madd16_x16,
    scale_store_f32x8,
    splat_i32x8,
    store_i32x8,
)

BLOCK = 16  # output channels per weight block (two ymm)
LANES = 8  # output channels per ymm
MIN_M = 4  # fewer rows: the GEMV micro-kernels (one weight pass per row) are the right shape
MT = 64  # activation rows per parallel task
NB = 4  # weight blocks (64 channels) per parallel task
INT32, SCALED = 0, 1  # epilogue modes (SCALED adds the bias when there is one)


@dataclass(frozen=True, eq=False)
class Blocks:
    """A weight re-laid for the broadcast kernel: ``data`` = ``[n_pad/16][taps * cq][16][4]`` bytes."""

    data: np.ndarray
    n_pad: int
    cq: int  # 4-byte K steps per tap
    cw_base: np.ndarray  # int32 (n_pad,) row sums, zero past n (times ``shift`` = the ``cw`` term)
    offset: int  # u = code + offset in ``data``


_BLOCKS: weakref.WeakKeyDictionary[PackedWeight, dict] = weakref.WeakKeyDictionary()


def weight_blocks(w: PackedWeight, taps: tuple[int, int, int] | None = None) -> Blocks:
    """``w`` in the broadcast layout, built once per packed weight and tap structure: ``taps`` =
    ``(c, kh, kw)`` re-orders a conv weight's K ``(c, kh, kw)`` into ``(kh, kw, c4)``."""
    cache = _BLOCKS.setdefault(w, {})
    blocks = cache.get(taps)
    if blocks is None:
        codes = unpack_weights(w).astype(np.int16)
        c, kh, kw = taps if taps is not None else (w.k, 1, 1)
        codes = codes.reshape(w.n, c, kh * kw).transpose(0, 2, 1)
        offset = 128 if w.bits == 8 else w.offset
        n_pad = -(-w.n // BLOCK) * BLOCK
        c4 = -(-c // 4) * 4
        full = np.zeros((n_pad, kh * kw, c4), dtype=np.uint8)  # pad bytes meet any activation: product 0
        full[: w.n, :, :c] = (codes + offset).astype(np.uint8)
        data = full.reshape(n_pad // BLOCK, BLOCK, kh * kw * c4 // 4, 4).transpose(0, 2, 1, 3).reshape(-1)
        sums = np.zeros(n_pad, dtype=np.int32)
        sums[: w.n] = w.row_sums
        blocks = cache[taps] = Blocks(np.ascontiguousarray(data), n_pad, c4 // 4, sums, offset)
    return blocks


@njit(inline="always")
def _mac(c, u, x):
    return add_i32x8(c, madd_ones(maddubs(u, x)))


@njit(inline="always")
def _mac2(c, u, x, v, y):
    """Two K steps summed in s16 before widening (2/4-bit weights only: |sum| <= 7680)."""
    return add_i32x8(c, madd_ones(add_i16x16(maddubs(u, x), maddubs(v, y))))


@njit(inline="always")
def _mac_w8(c, h, lo, x):
    """8-bit weights as nibbles, ``u = 16 h + lo``: each ``vpmaddubsw`` within 3840, widened exactly."""
    return add_i32x8(c, add_i32x8(madd16_x16(maddubs(h, x)), madd_ones(maddubs(lo, x))))


@njit(inline="always")
def _fix(v, c, s):
    """``v + shift * row_sums - offset * asum`` (``c`` and ``s`` already splat/loaded)."""
    return add_i32x8(add_i32x8(v, c), s)


@njit(inline="always")
def _pixel(i, hw, wo, hp, wp, sh, sw):
    b = i // hw
    r = i - b * hw
    oh = r // wo
    return (b * hp + oh * sh) * wp + (r - oh * wo) * sw


simd.pin_kernels("gemm_avx2", _mac, _mac2, _mac_w8, _fix, _pixel)


@functools.cache
def driver(w8: bool, parallel: bool):
    """The implicit GEMM over (64-row, 64-channel) tasks (module docstring).

    Everything that touches an array is written out in this one function: a jitted helper taking
    arrays, even inlined, kept an NRT incref/decref pair per array per call, about 100 atomic
    operations per 4 x 16 tile (1 us: a 1x1 conv with K = 64 ran at 4 GMAC/s instead of 40).
    """

    def core(a8, psum, tapoff, tappix, wp, cw, offset, m, n, n_pad, cq, ps, geo, mode, out_i, out_f, scale, bias,
             has_bias):
        # tapoff: byte offset of each tap run (cq 4-byte K steps each); tappix: pixel offset of every tap (sums)
        ho, wo, hp, wpad, sh, sw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
        hw = ho * wo
        ntaps = tapoff.shape[0]
        ws = ntaps * cq * 64  # bytes per 16-channel block
        nblk = n_pad // BLOCK
        ntiles = (nblk + NB - 1) // NB
        mtiles = (m + MT - 1) // MT
        for t in prange(ntiles * mtiles):
            nt = t // mtiles
            mt = t - nt * mtiles
            tmp = np.empty(4 * BLOCK, dtype=np.int32)
            for i in range(mt * MT, min(m, mt * MT + MT), 4):
                rows = min(4, m - i)
                p0 = _pixel(i, hw, wo, hp, wpad, sh, sw)
                p1 = _pixel(min(i + 1, m - 1), hw, wo, hp, wpad, sh, sw)  # rows past m: read, never stored
                p2 = _pixel(min(i + 2, m - 1), hw, wo, hp, wpad, sh, sw)
                p3 = _pixel(min(i + 3, m - 1), hw, wo, hp, wpad, sh, sw)
                s0, s1, s2, s3 = 0, 0, 0, 0
                for j in range(tappix.shape[0]):
                    d = tappix[j]
                    s0 += psum[p0 + d]
                    s1 += psum[p1 + d]
                    s2 += psum[p2 + d]
                    s3 += psum[p3 + d]
                v0, v1 = splat_i32x8(-offset * s0), splat_i32x8(-offset * s1)
                v2, v3 = splat_i32x8(-offset * s2), splat_i32x8(-offset * s3)
                a0, a1, a2, a3 = p0 * ps, p1 * ps, p2 * ps, p3 * ps
                for b in range(nt * NB, min(nblk, nt * NB + NB)):
                    z = zero_i32x8()
                    c00, c01, c10, c11, c20, c21, c30, c31 = z, z, z, z, z, z, z, z
                    for tap in range(ntaps):
                        d = tapoff[tap]
                        wt = b * ws + tap * cq * 64
                        if w8:
                            for q in range(cq):
                                g0 = load_i8x32(wp, wt + 64 * q)
                                g1 = load_i8x32(wp, wt + 64 * q + 32)
                                h0, l0 = unpack_i8x32(g0, 4, 15), unpack_i8x32(g0, 0, 15)
                                h1, l1 = unpack_i8x32(g1, 4, 15), unpack_i8x32(g1, 0, 15)
                                k = d + 4 * q
                                x = bcast4_i8x32(a8, a0 + k)
                                c00, c01 = _mac_w8(c00, h0, l0, x), _mac_w8(c01, h1, l1, x)
                                x = bcast4_i8x32(a8, a1 + k)
                                c10, c11 = _mac_w8(c10, h0, l0, x), _mac_w8(c11, h1, l1, x)
                                x = bcast4_i8x32(a8, a2 + k)
                                c20, c21 = _mac_w8(c20, h0, l0, x), _mac_w8(c21, h1, l1, x)
                                x = bcast4_i8x32(a8, a3 + k)
                                c30, c31 = _mac_w8(c30, h0, l0, x), _mac_w8(c31, h1, l1, x)
                        else:
                            for q in range(0, cq - 1, 2):
                                wq = wt + 64 * q
                                u0, u1 = load_i8x32(wp, wq), load_i8x32(wp, wq + 32)
                                g0, g1 = load_i8x32(wp, wq + 64), load_i8x32(wp, wq + 96)
                                k = d + 4 * q
                                x, y = bcast4_i8x32(a8, a0 + k), bcast4_i8x32(a8, a0 + k + 4)
                                c00, c01 = _mac2(c00, u0, x, g0, y), _mac2(c01, u1, x, g1, y)
                                x, y = bcast4_i8x32(a8, a1 + k), bcast4_i8x32(a8, a1 + k + 4)
                                c10, c11 = _mac2(c10, u0, x, g0, y), _mac2(c11, u1, x, g1, y)
                                x, y = bcast4_i8x32(a8, a2 + k), bcast4_i8x32(a8, a2 + k + 4)
                                c20, c21 = _mac2(c20, u0, x, g0, y), _mac2(c21, u1, x, g1, y)
                                x, y = bcast4_i8x32(a8, a3 + k), bcast4_i8x32(a8, a3 + k + 4)
                                c30, c31 = _mac2(c30, u0, x, g0, y), _mac2(c31, u1, x, g1, y)
                            if cq % 2 == 1:
                                wq = wt + 64 * (cq - 1)
                                u0, u1 = load_i8x32(wp, wq), load_i8x32(wp, wq + 32)
                                k = d + 4 * (cq - 1)
                                x = bcast4_i8x32(a8, a0 + k)
                                c00, c01 = _mac(c00, u0, x), _mac(c01, u1, x)
                                x = bcast4_i8x32(a8, a1 + k)
                                c10, c11 = _mac(c10, u0, x), _mac(c11, u1, x)
                                x = bcast4_i8x32(a8, a2 + k)
                                c20, c21 = _mac(c20, u0, x), _mac(c21, u1, x)
                                x = bcast4_i8x32(a8, a3 + k)
                                c30, c31 = _mac(c30, u0, x), _mac(c31, u1, x)
                    col = b * BLOCK
                    e0, e1 = load_i32x8(cw, col), load_i32x8(cw, col + LANES)
                    c00, c01, c10, c11 = _fix(c00, e0, v0), _fix(c01, e1, v0), _fix(c10, e0, v1), _fix(c11, e1, v1)
                    c20, c21, c30, c31 = _fix(c20, e0, v2), _fix(c21, e1, v2), _fix(c30, e0, v3), _fix(c31, e1, v3)
                    o = i * n + col
                    if rows == 4 and col + BLOCK <= n and mode == SCALED:
                        scale_store_f32x8(out_f, o, c00, scale, bias, col, has_bias)
                        scale_store_f32x8(out_f, o + LANES, c01, scale, bias, col + LANES, has_bias)
                        scale_store_f32x8(out_f, o + n, c10, scale, bias, col, has_bias)
                        scale_store_f32x8(out_f, o + n + LANES, c11, scale, bias, col + LANES, has_bias)
                        scale_store_f32x8(out_f, o + 2 * n, c20, scale, bias, col, has_bias)
                        scale_store_f32x8(out_f, o + 2 * n + LANES, c21, scale, bias, col + LANES, has_bias)
                        scale_store_f32x8(out_f, o + 3 * n, c30, scale, bias, col, has_bias)
                        scale_store_f32x8(out_f, o + 3 * n + LANES, c31, scale, bias, col + LANES, has_bias)
                    else:  # int32 output, a partial block or the last rows: through ``tmp``
                        store_i32x8(tmp, 0, c00)
                        store_i32x8(tmp, LANES, c01)
                        store_i32x8(tmp, BLOCK, c10)
                        store_i32x8(tmp, BLOCK + LANES, c11)
                        store_i32x8(tmp, 2 * BLOCK, c20)
                        store_i32x8(tmp, 2 * BLOCK + LANES, c21)
                        store_i32x8(tmp, 3 * BLOCK, c30)
                        store_i32x8(tmp, 3 * BLOCK + LANES, c31)
                        cols = min(BLOCK, n - col)
                        for r in range(rows):
                            for q in range(cols):
                                acc = tmp[r * BLOCK + q]
                                if mode == INT32:
                                    out_i[o + r * n + q] = acc
                                elif has_bias:
                                    out_f[o + r * n + q] = np.float32(acc) * scale[col + q] + bias[col + q]
                                else:
                                    out_f[o + r * n + q] = np.float32(acc) * scale[col + q]

    variant = "parallel" if parallel else "serial"
    fn = njit(parallel=parallel, cache=True)(simd.cache_variant(core, variant))
    simd.pin_uuid(fn, f"gemm_avx2.{'w8' if w8 else 'wq'}.core.{variant}")
    return fn


ONE_TAP = np.zeros(1, dtype=np.int64)
GEMM_GEO = np.ones(6, dtype=np.int64)  # pixel(i) = i
NO_F32 = np.zeros(LANES, dtype=np.float32)
NO_I32 = np.zeros(LANES, dtype=np.int32)


def run(a8: np.ndarray, asum: np.ndarray, w: PackedWeight, shift: int, m: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` = the exact int32 product of one group (``a8`` rows of ``w.k_pad`` bytes, pad columns
    zero, ``asum`` their sums)."""
    blocks = weight_blocks(w)
    cw = (shift * blocks.cw_base).astype(np.int32)
    driver(w.bits == 8, parallel)(a8, asum, ONE_TAP, ONE_TAP, blocks.data, cw, blocks.offset, m, w.n, blocks.n_pad,
                                  blocks.cq, w.k_pad, GEMM_GEO, INT32, out.reshape(-1), NO_F32, NO_F32, NO_F32,
                                  False)


_LAUNCH: weakref.WeakKeyDictionary[PackedWeight, dict] = weakref.WeakKeyDictionary()


def _launch(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int) -> tuple:
    """The constant arguments of one conv shape, built once: weight blocks, ``cw``, per-tap byte and
    pixel offsets in the padded buffer, the output geometry. With dilation 1 along W, a kernel row's
    ``kw`` taps are ``kw * c4`` contiguous bytes of the buffer, in the weights' K order ``(kh, kw, c4)``:
    the GEMM runs them as one tap of ``kw * cq`` K steps (longer inner loops; a 7x7 stem on 3 channels
    has 1 step per tap otherwise), while the activation sums still visit every tap's pixel."""
    key = (shift, c, geom, hp, wpad)
    cache = _LAUNCH.setdefault(w, {})
    args = cache.get(key)
    if args is None:
        kh, kw, sh, sw, _, _, dh, dw, _, ho, wo = geom
        blocks = weight_blocks(w, (c, kh, kw))
        pix = np.array([i * dh * wpad + j * dw for i in range(kh) for j in range(kw)], dtype=np.int64)
        cw = (shift * blocks.cw_base).astype(np.int32)
        geo = np.array((ho, wo, hp, wpad, sh, sw), dtype=np.int64)
        rows, steps = (pix[::kw], kw * blocks.cq) if dw == 1 else (pix, blocks.cq)
        args = cache[key] = (rows * blocks.cq * 4, pix, blocks.data, cw, blocks.offset, w.n, blocks.n_pad, steps,
                             blocks.cq * 4, geo)
    return args


def conv(a8: np.ndarray, psum: np.ndarray, w: PackedWeight, shift: int, c: int, geom: tuple[int, ...],
         hp: int, wpad: int, m: int, scale: np.ndarray, bias: np.ndarray | None, y: np.ndarray,
         parallel: bool) -> None:
    """``y`` (m, n) float32 = the dequantized conv of padded NHWC shifted codes ``a8`` (``hp x wpad``
    pixels of ``c4`` bytes, per-pixel sums ``psum``, from ``conv_nhwc._pad_codes``); ``geom`` from
    ``conv.conv_geometry``."""
    off, pix, data, cw, offset, n, n_pad, steps, c4, geo = _launch(w, shift, c, geom, hp, wpad)
    driver(w.bits == 8, parallel)(a8, psum, off, pix, data, cw, offset, m, n, n_pad, steps, c4, geo, SCALED, NO_I32,
                                  y.reshape(-1), scale, scale if bias is None else bias, bias is not None)
