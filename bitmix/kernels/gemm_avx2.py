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

* 2/4-bit weights: ``u <= 15``, so a pair is at most ``2 * 15 * 128 = 3840`` in magnitude, and less
  for narrower activations (``2 * 15 * 15 = 450`` beside unsigned 4-bit codes). A chunk of K steps is
  summed in s16 before one ``vpmaddwd`` widens it (``chunk_steps``: 8 steps at 3840, 72 at 450), so
  most of the multiplies are the ``vpmaddubsw`` themselves.
* 8-bit weights: ``u <= 255`` and a pair can reach ``2 * 255 * 128 = 65280``, which saturates.
  So both operands are widened to 16 bits in registers and multiplied by ``vpmaddwd`` (s16 pairs
  summed to s32, exact): the even bytes of a K step's 32 weight bytes zero-extended (``vpand``) beside
  the broadcast activations' even bytes sign-extended (``vpsllw`` + ``vpsraw``), the odd ones
  likewise (``vpsrlw``; ``vpsraw``). Two ``vpmaddwd`` per K step and 8 channels, where the nibble
  split it replaced (``u = 16 h + l``, a ``vpmaddubsw`` and a ``vpmaddwd`` for each) took four; same
  layout and result. One thread on Zen 3, ResNet's 7x7 stem 3.85 -> 3.08 ms, 3x3 convs 1.33x.

The result is ``dot(u, a8) - offset * asum + shift * row_sums``; every s32 lane stays below
2^31 because ``k_pad <= limits.MAX_K_PAD`` (65536 * 255 * 128 < 2^31). Convolutions run as
an implicit GEMM over a zero-padded NHWC code buffer, exactly as in ``gemm_vnni`` (see there);
the epilogue stores the int32 or ``float32(acc) * scale (+ bias)`` (``quant``'s formula), then, for a
conv, ``+ residual`` and the clamp of a following ReLU, as ``gemm_vnni``'s: done after the kernel in numpy,
``np.copyto(y, lo, where=y < lo)`` mispredicted a branch per element (1.7 ms for one 56x56x64 ReLU, 0.03 ms
on an all-positive mask; 1x1 conv 3136 x 64 -> 64: 1.9 ms against 0.14 ms for its GEMM).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.broadcast import (
    BLOCK,
    GEMM_GEO,
    ONE_TAP,
    conv_launch,
    first_pixel,
    four_dests,
    four_pixels,
    weight_blocks,
)
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.simd import (
    add_i16x16,
    add_i32x8,
    load_i8x32,
    madd_ones,
    maddubs,
    zero_i16x16,
    zero_i32x8,
)
from bitmix.kernels.simd_avx2 import (
    bcast4_i8x32,
    even_s8_words,
    even_u8_words,
    load_i32x8,
    madd_i16x16,
    odd_s8_words,
    odd_u8_words,
    splat_i32x8,
    store_codes_4x16,
    store_codes_x8,
    store_floats_x16,
    store_lanes_x8,
)

LANES = 8  # output channels per ymm
MIN_M = 4  # fewer rows: the GEMV micro-kernels (one weight pass per row) are the right shape
MT = 64  # activation rows per parallel task
NB = 4  # weight blocks (64 channels) per parallel task
NB_CODES = 8  # the same for the codes epilogue: its tasks walk the next conv's pixels too, once per 4 rows and task,
# and its convs are mostly small-K expansions into 96..192 channels (NB = 4 split 96 into 64 + 32: one thread,
# 112x112 16 -> 96 650 -> 593 us, 56x56 24 -> 144 280 -> 263 us; ResNet-50 1x1 shapes, K 64..2048: noise)
NB_ALL = 12  # up to this many blocks, one codes task takes them all (144 channels split 128 + 16 redid the rows' walk)
INT32, SCALED, ROWS = 0, 1, 2  # epilogue modes (SCALED adds the bias when there is one; ROWS is SCALED
# with each row also multiplied by its ``row_scale`` before the bias: per-row activation steps)
ONE = np.float32(1)


@njit(inline="always")
def _acc16(h, u, x):
    """One K step's ``vpmaddubsw`` added in s16 (the caller bounds the sum: ``chunk_steps``)."""
    return add_i16x16(h, maddubs(u, x))


@njit(inline="always")
def _widen(c, h):
    """A chunk's s16 sums widened into the s32 accumulator (``vpmaddwd`` with ones)."""
    return add_i32x8(c, madd_ones(h))


@njit(inline="always")
def _mac_w8(c, ue, uo, xe, xo):
    """8-bit weights' K step in 16 bits: even bytes' words times even, odd times odd (``vpmaddwd``, exact)."""
    return add_i32x8(c, add_i32x8(madd_i16x16(xe, ue), madd_i16x16(xo, uo)))


@njit(inline="always")
def _fix(v, c, s):
    """``v + shift * row_sums - offset * asum`` (``c`` and ``s`` already splat/loaded)."""
    return add_i32x8(add_i32x8(v, c), s)


simd.pin_kernels("gemm_avx2", _acc16, _widen, _mac_w8, _fix)


@functools.cache
def driver(w8: bool, parallel: bool, codes: bool = False):
    """The implicit GEMM over (64-row, 64-channel) tasks (module docstring); ``codes``: the variant whose
    epilogue writes the next conv's input codes (``gemm_vnni``'s CODES mode), compiled apart.

    Everything that touches an array is written out in this one function: a jitted helper taking
    arrays, even inlined, kept an NRT incref/decref pair per array per call, about 100 atomic
    operations per 4 x 16 tile (1 us: a 1x1 conv with K = 64 ran at 4 GMAC/s instead of 40).
    """

    def core(a8, psum, tapoff, tappix, wp, cw, offset, m, n, n_pad, cq, ps, geo, mode, out_i, out_f, scale, bias,
             has_bias, row_scale, res, has_res, lo, hi, out8, cgeo, q8, chunk):
        # tapoff: byte offset of each tap run (cq 4-byte K steps each); tappix: pixel offset of every tap (sums)
        # codes: out8 = the next conv's padded codes, cgeo = its (Hp, Wp, ph, pw, c4), q8 = tile_codes_bounds then
        # exact_blocks' flags, which store_codes_4x16 takes as a tuple: registers, not loads after every store (out8
        # might alias q8)
        qv0, qv1, qv2, qv3, qv4, qv5, qv6, qv7 = q8[0], q8[1], q8[2], q8[3], q8[4], q8[5], q8[6], q8[7]
        ho, wo, hp, wpad, sh, sw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
        hp2, wp2, ph2, pw2, c4n = cgeo[0], cgeo[1], cgeo[2], cgeo[3], cgeo[4]
        hw = ho * wo
        # a 1x1 stride-1 conv on an unpadded input reads pixel i for row i, and an unpadded next buffer (a depthwise
        # conv's) takes row i at pixel i: no pixel walk (per four rows it cost as much as a 16-channel block's GEMM)
        flat_in = hp == ho and wpad == wo and sh == 1 and sw == 1
        flat_out = hp2 == ho and wp2 == wo and ph2 == 0 and pw2 == 0
        walk = not flat_in or (codes and not flat_out)
        ntaps = tapoff.shape[0]
        # one tap run whose K fits one s16 chunk (1x1 convs on 4-bit codes: K <= 4 * 136 beside signed 4-bit ones):
        # no chunk loop keeping the s32 sums across it, on the stack (56x56 24 -> 144, one thread: GEMM part of the
        # codes conv 127 -> 97 us)
        one_chunk = not w8 and ntaps == 1 and cq <= chunk
        ws = ntaps * cq * 64  # bytes per 16-channel block
        nblk = n_pad // BLOCK
        nb = (nblk if nblk <= NB_ALL else NB_CODES) if codes else NB
        ntiles = (nblk + nb - 1) // nb
        mtiles = (m + MT - 1) // MT
        for t in prange(ntiles * mtiles):
            nt = t // mtiles
            mt = t - nt * mtiles
            pb, poh, pw = first_pixel(mt * MT, hw, wo)
            for i in range(mt * MT, min(m, mt * MT + MT), 4):
                rows = min(4, m - i)
                if walk:
                    p0, p1, p2, p3, pb, poh, pw = four_pixels(pb, poh, pw, rows, ho, wo, hp, wpad, sh, sw)
                else:  # pixel = row (rows past m repeat the last real one, as four_pixels')
                    p0, p1, p2, p3 = i, i + min(1, rows - 1), i + min(2, rows - 1), i + min(3, rows - 1)
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
                d0, d1, d2, d3 = 0, 0, 0, 0
                if codes and flat_out:
                    d0, d1, d2, d3 = i, i + 1, i + 2, i + 3
                elif codes:  # the next conv's pixels of these rows, once for all the task's blocks
                    d0, d1, d2, d3 = four_dests(pb, poh, pw, ho, wo, hp2, wp2, ph2, pw2)
                for b in range(nt * nb, min(nblk, nt * nb + nb)):
                    z = zero_i32x8()
                    c00, c01, c10, c11, c20, c21, c30, c31 = z, z, z, z, z, z, z, z
                    if one_chunk:  # the s16 sums widened once, straight into the accumulators
                        z16 = zero_i16x16()
                        h00, h01, h10, h11, h20, h21, h30, h31 = z16, z16, z16, z16, z16, z16, z16, z16
                        d, wt = tapoff[0], b * ws
                        for q in range(cq):
                            wq = wt + 64 * q
                            u0, u1 = load_i8x32(wp, wq), load_i8x32(wp, wq + 32)
                            k = d + 4 * q
                            x = bcast4_i8x32(a8, a0 + k)
                            h00, h01 = _acc16(h00, u0, x), _acc16(h01, u1, x)
                            x = bcast4_i8x32(a8, a1 + k)
                            h10, h11 = _acc16(h10, u0, x), _acc16(h11, u1, x)
                            x = bcast4_i8x32(a8, a2 + k)
                            h20, h21 = _acc16(h20, u0, x), _acc16(h21, u1, x)
                            x = bcast4_i8x32(a8, a3 + k)
                            h30, h31 = _acc16(h30, u0, x), _acc16(h31, u1, x)
                        c00, c01, c10, c11 = madd_ones(h00), madd_ones(h01), madd_ones(h10), madd_ones(h11)
                        c20, c21, c30, c31 = madd_ones(h20), madd_ones(h21), madd_ones(h30), madd_ones(h31)
                    for tap in range(0 if one_chunk else ntaps):
                        d = tapoff[tap]
                        wt = b * ws + tap * cq * 64
                        if w8:
                            for q in range(cq):
                                g0 = load_i8x32(wp, wt + 64 * q)
                                g1 = load_i8x32(wp, wt + 64 * q + 32)
                                e0, o0 = even_u8_words(g0), odd_u8_words(g0)
                                e1, o1 = even_u8_words(g1), odd_u8_words(g1)
                                k = d + 4 * q
                                x = bcast4_i8x32(a8, a0 + k)
                                xe, xo = even_s8_words(x), odd_s8_words(x)
                                c00, c01 = _mac_w8(c00, e0, o0, xe, xo), _mac_w8(c01, e1, o1, xe, xo)
                                x = bcast4_i8x32(a8, a1 + k)
                                xe, xo = even_s8_words(x), odd_s8_words(x)
                                c10, c11 = _mac_w8(c10, e0, o0, xe, xo), _mac_w8(c11, e1, o1, xe, xo)
                                x = bcast4_i8x32(a8, a2 + k)
                                xe, xo = even_s8_words(x), odd_s8_words(x)
                                c20, c21 = _mac_w8(c20, e0, o0, xe, xo), _mac_w8(c21, e1, o1, xe, xo)
                                x = bcast4_i8x32(a8, a3 + k)
                                xe, xo = even_s8_words(x), odd_s8_words(x)
                                c30, c31 = _mac_w8(c30, e0, o0, xe, xo), _mac_w8(c31, e1, o1, xe, xo)
                        else:
                            for q0 in range(0, cq, chunk):
                                z16 = zero_i16x16()
                                h00, h01, h10, h11, h20, h21, h30, h31 = z16, z16, z16, z16, z16, z16, z16, z16
                                for q in range(q0, min(cq, q0 + chunk)):
                                    wq = wt + 64 * q
                                    u0, u1 = load_i8x32(wp, wq), load_i8x32(wp, wq + 32)
                                    k = d + 4 * q
                                    x = bcast4_i8x32(a8, a0 + k)
                                    h00, h01 = _acc16(h00, u0, x), _acc16(h01, u1, x)
                                    x = bcast4_i8x32(a8, a1 + k)
                                    h10, h11 = _acc16(h10, u0, x), _acc16(h11, u1, x)
                                    x = bcast4_i8x32(a8, a2 + k)
                                    h20, h21 = _acc16(h20, u0, x), _acc16(h21, u1, x)
                                    x = bcast4_i8x32(a8, a3 + k)
                                    h30, h31 = _acc16(h30, u0, x), _acc16(h31, u1, x)
                                c00, c01 = _widen(c00, h00), _widen(c01, h01)
                                c10, c11 = _widen(c10, h10), _widen(c11, h11)
                                c20, c21 = _widen(c20, h20), _widen(c21, h21)
                                c30, c31 = _widen(c30, h30), _widen(c31, h31)
                    col = b * BLOCK
                    e0, e1 = load_i32x8(cw, col), load_i32x8(cw, col + LANES)
                    c00, c01, c10, c11 = _fix(c00, e0, v0), _fix(c01, e1, v0), _fix(c10, e0, v1), _fix(c11, e1, v1)
                    c20, c21, c30, c31 = _fix(c20, e0, v2), _fix(c21, e1, v2), _fix(c30, e0, v3), _fix(c31, e1, v3)
                    cols = min(BLOCK, n - col)  # stored lanes: a partial block ends early
                    if codes:
                        if cols == BLOCK:
                            qt = (qv0, qv1, qv2, qv3, qv4, qv5, qv6, qv7, q8[8 + b])
                            store_codes_4x16(out8, d0 * c4n + col, d1 * c4n + col, d2 * c4n + col, d3 * c4n + col,
                                             rows, c00, c01, c10, c11, c20, c21, c30, c31, scale, bias, col, qt)
                            continue
                        hi8 = col + LANES
                        store_codes_x8(out8, d0 * c4n + col, c00, scale, bias, col, has_bias, lo, hi, q8, cols)
                        store_codes_x8(out8, d0 * c4n + hi8, c01, scale, bias, hi8, has_bias, lo, hi, q8, cols - LANES)
                        if rows > 1:
                            store_codes_x8(out8, d1 * c4n + col, c10, scale, bias, col, has_bias, lo, hi, q8, cols)
                            store_codes_x8(out8, d1 * c4n + hi8, c11, scale, bias, hi8, has_bias, lo, hi, q8,
                                           cols - LANES)
                        if rows > 2:
                            store_codes_x8(out8, d2 * c4n + col, c20, scale, bias, col, has_bias, lo, hi, q8, cols)
                            store_codes_x8(out8, d2 * c4n + hi8, c21, scale, bias, hi8, has_bias, lo, hi, q8,
                                           cols - LANES)
                        if rows > 3:
                            store_codes_x8(out8, d3 * c4n + col, c30, scale, bias, col, has_bias, lo, hi, q8, cols)
                            store_codes_x8(out8, d3 * c4n + hi8, c31, scale, bias, hi8, has_bias, lo, hi, q8,
                                           cols - LANES)
                        continue
                    o = i * n + col
                    if cols == BLOCK and mode != INT32:
                        r = row_scale[i] if mode == ROWS else ONE
                        store_floats_x16(out_f, o, c00, c01, scale, bias, col, r, res, has_res, lo, hi)
                        if rows > 1:
                            r = row_scale[i + 1] if mode == ROWS else ONE
                            store_floats_x16(out_f, o + n, c10, c11, scale, bias, col, r, res, has_res, lo, hi)
                        if rows > 2:
                            r = row_scale[i + 2] if mode == ROWS else ONE
                            store_floats_x16(out_f, o + 2 * n, c20, c21, scale, bias, col, r, res, has_res, lo, hi)
                        if rows > 3:
                            r = row_scale[i + 3] if mode == ROWS else ONE
                            store_floats_x16(out_f, o + 3 * n, c30, c31, scale, bias, col, r, res, has_res, lo, hi)
                        continue
                    as_int, by_row = mode == INT32, mode == ROWS
                    r = row_scale[i] if by_row else ONE
                    store_lanes_x8(out_f, out_i, o, c00, scale, bias, col, has_bias, r, by_row, cols, as_int,
                                   res, has_res, lo, hi)
                    store_lanes_x8(out_f, out_i, o + LANES, c01, scale, bias, col + LANES, has_bias, r, by_row,
                                   cols - LANES, as_int, res, has_res, lo, hi)
                    if rows > 1:
                        r = row_scale[i + 1] if by_row else ONE
                        store_lanes_x8(out_f, out_i, o + n, c10, scale, bias, col, has_bias, r, by_row, cols, as_int,
                                       res, has_res, lo, hi)
                        store_lanes_x8(out_f, out_i, o + n + LANES, c11, scale, bias, col + LANES, has_bias, r,
                                       by_row, cols - LANES, as_int, res, has_res, lo, hi)
                    if rows > 2:
                        r = row_scale[i + 2] if by_row else ONE
                        store_lanes_x8(out_f, out_i, o + 2 * n, c20, scale, bias, col, has_bias, r, by_row, cols,
                                       as_int, res, has_res, lo, hi)
                        store_lanes_x8(out_f, out_i, o + 2 * n + LANES, c21, scale, bias, col + LANES, has_bias, r,
                                       by_row, cols - LANES, as_int, res, has_res, lo, hi)
                    if rows > 3:
                        r = row_scale[i + 3] if by_row else ONE
                        store_lanes_x8(out_f, out_i, o + 3 * n, c30, scale, bias, col, has_bias, r, by_row, cols,
                                       as_int, res, has_res, lo, hi)
                        store_lanes_x8(out_f, out_i, o + 3 * n + LANES, c31, scale, bias, col + LANES, has_bias, r,
                                       by_row, cols - LANES, as_int, res, has_res, lo, hi)

    variant = ("parallel" if parallel else "serial") + ("_codes" if codes else "")
    fn = njit(parallel=parallel, cache=True)(simd.cache_variant(core, variant))
    simd.pin_uuid(fn, f"gemm_avx2.{'w8' if w8 else 'wq'}.core.{variant}")
    return fn


NO_F32 = np.zeros(LANES, dtype=np.float32)
NO_I32 = np.zeros(LANES, dtype=np.int32)
NO_CLAMP = (np.float32(-np.inf), np.float32(np.inf))
NO_RESIDUAL = (NO_F32, False, *NO_CLAMP)  # no residual add, no clamp
NO_CODES = (np.zeros(LANES, dtype=np.int8), np.zeros(5, dtype=np.int64), np.ones(8, dtype=np.float32))  # out8, cgeo, q8


def byte_bound(lo: int, hi: int, shift: int) -> int:
    """The largest ``|code - shift|`` of an activation byte with codes in ``[lo, hi]``: ``chunk_steps``' ``a_max``."""
    return max(abs(lo - shift), abs(hi - shift))


def chunk_steps(w: PackedWeight, a_max: int = 128) -> int:
    """K steps (4 bytes each) whose ``vpmaddubsw`` results a tile sums in s16 before widening them to s32: each
    is at most ``2 * (2**bits - 1) * a_max`` in magnitude (``u <= 2**bits - 1``; ``a_max`` bounds the signed
    activation bytes, 128 for any), so that many stay within 32767 -- 8 for 4-bit weights beside 8-bit
    activations, 72 beside unsigned 4-bit ones, 42 for 2-bit weights. One ``vpmaddwd`` + ``vpaddd`` per chunk
    instead of per two steps. 8-bit weights take 16-bit ``vpmaddwd`` (module docstring) and ignore it."""
    return 1 if w.bits == 8 else max(1, 32767 // (2 * ((1 << w.bits) - 1) * max(1, a_max)))


def no_bias(n: int) -> np.ndarray:
    """The bias of a layer without one: -0.0s, which the full-block epilogues add unconditionally (``x + -0.0``
    is ``x`` bit for bit, -0.0 and NaN included)."""
    return np.full(n, -0.0, dtype=np.float32)


def run(a8: np.ndarray, asum: np.ndarray, w: PackedWeight, shift: int, m: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` = the exact int32 product of one group (``a8`` rows of ``w.k_pad`` bytes, pad columns
    zero, ``asum`` their sums)."""
    blocks = weight_blocks(w)
    cw = (shift * blocks.cw_base).astype(np.int32)
    driver(w.bits == 8, parallel)(a8, asum, ONE_TAP, ONE_TAP, blocks.data, cw, blocks.offset, m, w.n, blocks.n_pad,
                                  blocks.cq, w.k_pad, GEMM_GEO, INT32, out.reshape(-1), NO_F32, NO_F32, NO_F32,
                                  False, NO_F32, *NO_RESIDUAL, *NO_CODES, chunk_steps(w))


def conv_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
              scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple,
              parallel: bool, a_max: int = 128
              ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], None]:
    """The implicit-GEMM conv, ``run(a8, psum, y, res)``: ``y`` (m, n) float32 = the dequantized conv of padded
    NHWC shifted codes ``a8`` (per-pixel sums ``psum``, from ``conv_nhwc._pad_codes``), ``+ res`` (float32,
    ``y``'s layout, when ``residual``), clamped to ``clamp``, every constant argument bound once
    (``gemm_vnni.conv_gemm``)."""
    off, pix, data, cw, offset, n, n_pad, steps, c4, geo = conv_launch(w, shift, c, geom, hp, wpad)
    core = driver(w.bits == 8, parallel)
    chunk = chunk_steps(w, a_max)
    head = (off, pix, data, cw, offset, m, n, n_pad, steps, c4, geo, SCALED, NO_I32)
    tail = (scale, no_bias(n) if bias is None else bias, bias is not None, NO_F32)
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None) -> None:
        core(a8, psum, *head, y.reshape(-1), *tail, NO_F32 if res is None else res.reshape(-1), residual, lo, hi,
             *NO_CODES, chunk)

    return run


def codes_bounds(clamp: tuple, quant: tuple) -> np.ndarray:
    """``(step, lo, hi, shift)`` with the conv's clamp folded into the code bounds, so the epilogue clips once:
    ``clip(clamp(y, a, b) / s, qlo, qhi) == clip(y / s, lo, hi)`` bit for bit, where ``lo, hi`` is the overlap of
    ``[a / s, b / s]`` (float32 quotients: division by ``s > 0`` rounds monotonically) and ``[qlo, qhi]``, or
    the one bound every value lands on when they do not overlap."""
    step, qlo, qhi, shift = (np.float32(v) for v in quant)
    a, b = np.float32(clamp[0]) / step, np.float32(clamp[1]) / step
    lo, hi = (qlo, qlo) if b < qlo else (qhi, qhi) if a > qhi else (max(a, qlo), min(b, qhi))
    return np.array((step, lo, hi, shift), dtype=np.float32)


def tile_codes_bounds(clamp: tuple, quant: tuple) -> np.ndarray:
    """``codes_bounds`` (``step, lo, hi, shift``: ``store_codes_x8``'s) then ``recip, near, rint(lo), rint(hi)`` for
    ``store_codes_4x16``, which multiplies by ``recip = float32(1 / step)`` where it can: ``y * recip`` lies within
    ``|y / step| * 3.0001 * 2**-24`` of the rounded quotient (two roundings against one), under ``2**-12`` wherever
    that can change a code (codes lie in ``[-128, 255]``; a product past 512 in magnitude clips to the quotient's
    bound), so a product farther than ``2**-12`` from every half-code rounds to the quotient's code, and
    ``near = 0.5 - 2**-12`` bounds its distance to the nearest code. A step whose reciprocal is not a normal float
    gets ``near = -1``: every tile takes the division."""
    q = codes_bounds(clamp, quant)
    step = q[0]
    recip = np.float32(1) / step if step > 0 else np.float32(1)
    fast = bool(step > 0 and np.isfinite(step) and np.finfo(np.float32).tiny <= recip < np.inf)
    near = np.float32(0.5 - 2.0**-12) if fast else np.float32(-1)
    return np.concatenate([q, np.array((recip if fast else 1, near, np.rint(q[1]), np.rint(q[2])), np.float32)])


MAX_CHECKED = 1 << 24  # (channel, sum) pairs ``exact_blocks`` evaluates at most (~0.2 s at layer build)


def exact_blocks(w: PackedWeight, code_max: int, scale: np.ndarray, bias: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per 16-channel block, 1 where ``store_codes_4x16``'s multiply by ``recip`` gives the quotient's code for every
    sum a conv can reach, so its tiles skip the half-code test (a third of a small-K codes conv's time), else 0. A
    conv's exact sum in channel ``j`` is an integer within ``code_max * sum |w[j]|`` (input codes within
    ``[-code_max, code_max]``): all of them go through the tile's float ops here, against ``store_codes_x8``'s
    formula (``q``: ``tile_codes_bounds``). All 0 past ``MAX_CHECKED`` sums, or when the step's reciprocal is not
    normal."""
    flags = np.zeros(-(-w.n // BLOCK), dtype=np.float32)
    reach = code_max * np.abs(unpack_weights(w).astype(np.int64)).sum(axis=1)
    if q[5] < 0 or int((2 * reach + 1).sum()) > MAX_CHECKED:
        return flags
    step, lo, hi, recip, rlo, rhi = q[0], q[1], q[2], q[4], q[6], q[7]
    ok = np.ones(w.n, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(w.n):
            acc = np.arange(-reach[j], reach[j] + 1, dtype=np.int64).astype(np.float32)
            y = acc * scale[j] + bias[j]
            x = y * recip
            k = np.where(np.abs(x) < 2.0**31, np.rint(x), -(2.0**31))  # vcvtps2dq: INT_MIN past int32
            ok[j] = np.array_equal(np.clip(k, rlo, rhi), np.rint(np.clip(y / step, lo, hi)))
    flags[: w.n // BLOCK] = ok[: w.n // BLOCK * BLOCK].reshape(-1, BLOCK).all(axis=1)
    return flags


def conv_codes_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
                    scale: np.ndarray, bias: np.ndarray | None, clamp: tuple, parallel: bool, nxt_padded: tuple,
                    nxt_pad: tuple[int, int], nxt_quant: tuple, a_max: int = 128,
                    code_max: int | None = None) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``conv_gemm`` whose results go straight into the next conv's padded input codes, as
    ``gemm_vnni.conv_codes_gemm`` (same arguments, same codes): the floats are never stored. ``code_max``: the
    largest ``|code|`` of the input codes, if known (``exact_blocks``: tiles without the half-code test)."""
    off, pix, data, cw, offset, n, n_pad, steps, c4, geo = conv_launch(w, shift, c, geom, hp, wpad)
    core = driver(w.bits == 8, parallel, codes=True)
    bias = no_bias(n) if bias is None else bias
    head = (off, pix, data, cw, offset, m, n, n_pad, steps, c4, geo, SCALED, NO_I32, NO_F32, scale, bias, True,
            NO_F32, NO_F32, False, np.float32(-np.inf), np.float32(np.inf))
    cgeo = np.array((nxt_padded[1], nxt_padded[2], nxt_pad[0], nxt_pad[1], nxt_padded[3]), dtype=np.int64)
    q8 = tile_codes_bounds(clamp, nxt_quant)
    exact = exact_blocks(w, code_max, scale, bias, q8) if code_max is not None else np.zeros(n_pad // BLOCK)
    q8 = np.concatenate([q8, exact]).astype(np.float32)  # q8[8 + b]: block b skips the half-code test
    chunk = chunk_steps(w, a_max)

    def run(a8: np.ndarray, psum: np.ndarray, out8: np.ndarray) -> None:
        core(a8, psum, *head, out8, cgeo, q8, chunk)

    return run
