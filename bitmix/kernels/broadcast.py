"""What the two broadcast GEMMs (``gemm_vnni`` on zmm, ``gemm_avx2`` on ymm) share (issue 15).

Both read the same re-laid weight (``[n_pad/16][taps * cq][16][4]`` unsigned bytes ``u = code +
offset``), the same activation rows (signed bytes, zero-padded to ``k_pad``, with their sums) and
the same implicit-GEMM conv constants; only the register tile differs. So the layout, the
per-conv launch constants, the output-pixel map and the float -> code row pass live here once.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.scratch import aligned_copy

BLOCK = 16  # output channels per weight block
QROWS = 16  # rows per task of the quantize pass
# Fused linears quantize up to this many elements with the pass compiled without ``prange``: a parallel launch
# costs more than it splits (Sapphire Rapids, 2 threads, 2026-12-07, parallel / serial pass: 64 x 384 1.4-1.7x,
# per-row steps with the rotation 1.3x; 64 x 1536 0.75-0.9x).
SERIAL_QUANTIZE_MAX = 1 << 15
ONE_TAP = np.zeros(1, dtype=np.int64)  # a plain GEMM: one tap at offset 0
GEMM_GEO = np.ones(6, dtype=np.int64)  # pixel(i) = i
NO_SCALE = np.ones(1, dtype=np.float32)  # ``quantize_rows``'s ``a_scale`` when ``has_scale`` is False


@dataclass(frozen=True, eq=False)
class Blocks:
    """A weight re-laid for the broadcast kernels: ``data`` = ``[n_pad/16][taps * cq][16][4]`` bytes."""

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
        blocks = cache[taps] = Blocks(aligned_copy(data), n_pad, c4 // 4, sums, offset)
    return blocks


_LAUNCH: weakref.WeakKeyDictionary[PackedWeight, dict] = weakref.WeakKeyDictionary()


def conv_launch(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int) -> tuple:
    """The constant arguments of one conv shape, built once: per-tap-run byte offsets, every tap's
    pixel offset in the padded buffer (for the sums), weight bytes, ``cw``, offset, n, n_pad, K
    steps per run, ``c4``, the output geometry. With dilation 1 along W, a kernel row's ``kw`` taps
    are ``kw * c4`` contiguous bytes of both operands, in the weights' K order ``(kh, kw, c4)``: one
    run of ``kw * cq`` K steps (longer inner loops; a 7x7 stem on 3 channels has 1 step per tap
    otherwise), while the activation sums still visit every tap's pixel."""
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


@njit(inline="always")
def first_pixel(i, hw, wo):
    """``(b, oh, ow)`` of output row ``i``: two divisions, once per task (``next_pixel`` walks on)."""
    b = i // hw
    r = i - b * hw
    oh = r // wo
    return b, oh, r - oh * wo


@njit(inline="always")
def next_pixel(b, oh, ow, ho, wo):
    """``(b, oh, ow)`` of the next output row, without the divisions ``first_pixel`` costs (two 64-bit
    divisions per row took up to a third of a small-K tile: 1x1 conv 3136 x 64 -> 64)."""
    ow += 1
    if ow == wo:
        ow = 0
        oh += 1
        if oh == ho:
            oh = 0
            b += 1
    return b, oh, ow


@njit(inline="always")
def pixel_at(b, oh, ow, hp, wp, sh, sw):
    """Index in the padded buffer of the top-left input pixel of output pixel ``(b, oh, ow)``."""
    return (b * hp + oh * sh) * wp + ow * sw


@njit(inline="always")
def four_pixels(b, oh, ow, rows, ho, wo, hp, wp, sh, sw):
    """``pixel_at`` of the next four output rows from the walker's ``(b, oh, ow)`` (rows past the
    ``rows`` left repeat the last real one: read, never stored), and the walker's state after them."""
    p0 = pixel_at(b, oh, ow, hp, wp, sh, sw)
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    p1 = pixel_at(b, oh, ow, hp, wp, sh, sw) if rows > 1 else p0
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    p2 = pixel_at(b, oh, ow, hp, wp, sh, sw) if rows > 2 else p1
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    p3 = pixel_at(b, oh, ow, hp, wp, sh, sw) if rows > 3 else p2
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    return p0, p1, p2, p3, b, oh, ow


@njit(inline="always")
def four_dests(b, oh, ow, ho, wo, hp, wp, ph, pw):
    """The pixels, in the next conv's padded buffer (``hp x wp``, padding ``ph, pw``), of the four output rows
    before the walker's ``(b, oh, ow)`` (``four_pixels`` always steps four). ``gemm_vnni`` works them out after
    its K loop from state it keeps anyway: four more values live across that loop, or a task-local array passed to
    the inlined epilogue (an NRT reference-count call per store), each made its GEMM 10-40 % slower. ``gemm_avx2``
    works them out once per four rows, before its blocks' K loops: per 16-channel block they were a third of a
    K = 16 conv's time outside its multiplies (112x112 16 -> 96, one thread: 263 -> 179 us of 715)."""
    for _ in range(4):
        ow -= 1
        if ow < 0:
            ow = wo - 1
            oh -= 1
            if oh < 0:
                oh = ho - 1
                b -= 1
    d0 = (b * hp + oh + ph) * wp + ow + pw
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    d1 = (b * hp + oh + ph) * wp + ow + pw
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    d2 = (b * hp + oh + ph) * wp + ow + pw
    b, oh, ow = next_pixel(b, oh, ow, ho, wo)
    return d0, d1, d2, (b * hp + oh + ph) * wp + ow + pw


simd.pin_kernels("broadcast", first_pixel, next_pixel, pixel_at, four_pixels, four_dests)


def _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
    """``a8[i, q] = rint(clip(x[i, q] (* a_scale[q]) / step, lo, hi)) - shift`` (pad columns 0) and
    ``asum[i]`` each row's sum, in float32 as ``quant``; True if any NaN was seen (NaN codes are
    discarded)."""
    m, k = x.shape
    flo = np.float32(lo)
    fhi = np.float32(hi)
    sh = np.int32(shift)
    qblocks = (m + QROWS - 1) // QROWS
    nan = np.zeros(qblocks, dtype=np.bool_)
    for t in prange(qblocks):
        seen = False
        for i in range(t * QROWS, min(m, t * QROWS + QROWS)):
            src = x[i]
            base = i * kp
            s = np.int32(0)
            if has_scale:
                for q in range(k):
                    v = (src[np.uintp(q)] * a_scale[np.uintp(q)]) / step
                    seen |= v != v  # branch-free flag keeps the loop vectorised
                    code = np.int32(np.rint(min(max(v, flo), fhi))) - sh
                    a8[np.uintp(base + q)] = code
                    s += code
            else:
                for q in range(k):
                    v = src[np.uintp(q)] / step
                    seen |= v != v
                    code = np.int32(np.rint(min(max(v, flo), fhi))) - sh
                    a8[np.uintp(base + q)] = code
                    s += code
            for q in range(k, kp):
                a8[np.uintp(base + q)] = 0
            asum[i] = s
        nan[t] = seen
    return nan.any()


@functools.cache
def quantize_rows(parallel: bool):
    """``_quantize`` compiled with (``parallel``) or without ``prange`` threads, one cache entry each."""
    variant = "parallel" if parallel else "serial"
    fn = njit(parallel=parallel, cache=True)(simd.cache_variant(_quantize, variant))
    return simd.pin_uuid(fn, f"broadcast.quantize.{variant}")


class LinearOperands:
    """A quantized linear's constant operands for a fused quantize + broadcast-GEMM kernel, prepared
    once (at lowering) so a call only checks ``x``; ``w_scales``/``bias`` float32 ``(n,)``,
    ``a_scale`` float32 ``(k,)`` or None, validated by the caller (``linear.LinearKernel``).
    ``row_floor``: per-row steps (``row_steps``), row i's ``a_step * max(max|x[i]|, row_floor)``;
    the GEMM then scales by ``w_scales`` alone and the row pass after it by the row's step.
    ``rotation``: float32 ``(k,)`` signs of the input's online rotation, which per-row-step kernels run in
    their quantize pass (``row_steps._quantize``; block 0: none)."""

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: np.float32, lo: int, hi: int, shift: int,
                 bias: np.ndarray | None, a_scale: np.ndarray | None, row_floor: float | None = None,
                 rotation: np.ndarray | None = None) -> None:
        self.w = w
        self.signs = NO_SCALE if rotation is None else np.ascontiguousarray(rotation, dtype=np.float32)
        self.block = 0 if rotation is None else w.k & -w.k
        self.step = np.float32(a_step)
        self.lo, self.hi, self.shift = lo, hi, shift
        self.row_floor = None if row_floor is None else np.float32(row_floor)
        self.scale = ((self.step if row_floor is None else np.float32(1)) * w_scales).astype(np.float32)
        self.has_bias = bias is not None
        # none: -0.0s, which the AVX2 epilogue adds unconditionally (``x + -0.0 == x`` bit for bit)
        self.bias = (np.ascontiguousarray(bias, dtype=np.float32) if bias is not None
                     else np.full(w.n, -0.0, dtype=np.float32))
        self.has_scale = a_scale is not None
        self.a_scale = np.ascontiguousarray(a_scale, dtype=np.float32) if a_scale is not None else NO_SCALE
        self.layout()

    def layout(self) -> None:
        """The weight as the kernel reads it: here the broadcast blocks and their shift correction."""
        self.blocks = weight_blocks(self.w)
        self.cw = (self.shift * self.blocks.cw_base).astype(np.int32)
