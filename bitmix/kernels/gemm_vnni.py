"""Register-blocked AVX-512 VNNI GEMM and implicit-GEMM conv for 4 or more activation rows (issue 15).

The dot-product micro-kernels of ``isa.avx512vnni`` keep one accumulator per (row, output)
pair and end every K loop with horizontal sums; on a conv GEMM (thousands of rows, K of a few
hundred) those sums and the per-row 32-byte gathers cost about as much as the ``vpdpbusd``s.
Here, as in MLAS's and oneDNN's int8 kernels, the weights are re-laid once per layer as
``[n/16][k/4][16][4]`` bytes (16 output channels x 4 K codes = one zmm), the four activation
bytes of a K step are broadcast, and a 4-row x 64-channel tile accumulates in 16 zmm
registers with no reduction at all. The weights are stored unpacked, one unsigned byte per
code, ``u = code + offset`` (the packed layout's offset for 2/4-bit, 128 for 8-bit), so the
broadcast activations are always vpdpbusd's signed operand and every width runs one loop body
(with 8-bit activations as the unsigned operand instead, LLVM 22's instruction selection on the
broadcast did not finish in 10 minutes). This copy costs one byte per weight.

Convolutions run as an implicit GEMM, as oneDNN's direct int8 convs do: K is ordered
``(kh, kw, c4)`` (``c4`` = C rounded up to 4, weight bytes past C are 0) and the activation
row of output pixel ``p`` at tap ``t`` is read straight from a zero-padded NHWC code buffer at
``pixel(p) * c4 + tap_offset[t]``, so no im2col copy exists. A plain GEMM is the one-tap case
(``pixel(i) = i``, rows ``k_pad`` bytes apart). The exact result is
``dot(u, a8) - offset * asum + shift * row_sums``, ``asum`` of a row being the sum of its taps'
pixel sums; every s32 lane stays below 2^31 because ``k_pad <= tiling.MAX_K_PAD``
(65536 * 255 * 128 < 2^31). The epilogue either stores that int32 or the dequantized float
``float32(acc) * scale + bias`` (``quant``'s formula) straight into the NHWC output.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from bitmix.kernels import simd
from bitmix.kernels.broadcast import (
    GEMM_GEO,
    ONE_TAP,
    conv_launch,
    first_pixel,
    four_pixels,
    weight_blocks,
)
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.simd import (
    add_i32x16,
    bcast4_i8x64,
    dpbusd512,
    i32x16,
    load_i8x64,
    load_i32x16,
    splat_i32x16,
    store_i32x16,
    zero_i32x16,
)

LANES = 16  # output channels per zmm
MIN_M = 4  # fewer rows: the GEMV micro-kernels (one weight pass per row) are the right shape
MT = 64  # activation rows per parallel task
# Epilogue modes: the int32 product, or floats ``float32(acc) * scale`` (SCALED), ``+ bias`` (BIAS),
# ``+ residual`` (RESIDUAL), then clamped to [lo, hi] (-inf/inf: no clamp). ROWS: the product is also
# multiplied by its row's factor ``res[row]`` before the bias (per-row activation steps; ``res`` then
# holds one float32 per row and no residual is added).
INT32, SCALED, BIAS, RESIDUAL, ROWS = 0, 1, 2, 4, 8
SCALED_BIASED = SCALED | BIAS
NO_CLAMP = (np.float32(-np.inf), np.float32(np.inf))
_F32X16 = ir.VectorType(ir.FloatType(), 16)


@intrinsic
def store_epilogue(typingctx, out, idx, v, scale, bias, res, col, mode, lo, hi, row_scale):
    """``out[idx:idx+16] = clamp(float32(v) * scale[col:] (* row_scale) (+ bias[col:]) (+ res[idx:]), lo,
    hi)``, the float ops of the reference in its order (``vmulps`` and ``vaddps``s, never an FMA); the
    clamp is two compare-selects that keep NaN and -0.0, as torch's relu/hardtanh do. ``res`` is read
    only when ``mode & RESIDUAL``, ``row_scale`` used only when ``mode & ROWS``."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == f32 and scale == f32 and bias == f32 and res == f32 and v == i32x16
            and all(isinstance(a, types.Integer) for a in (idx, col, mode))
            and lo == hi == row_scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v_a, scale_a, bias_a, res_a, col_a, mode_a, lo_a, hi_a, rs_a = args

        def ptr(k, pos_k):
            ary = context.make_array(sig.args[k])(context, builder, value=args[k])
            pos = context.cast(builder, args[pos_k], sig.args[pos_k], types.intp)
            return builder.bitcast(builder.gep(ary.data, [pos]), _F32X16.as_pointer())

        def flag(bit):
            m = context.cast(builder, mode_a, sig.args[7], types.int64)
            return builder.icmp_unsigned("!=", builder.and_(m, ir.Constant(ir.IntType(64), bit)),
                                         ir.Constant(ir.IntType(64), 0))

        def splat(x):
            vec = builder.insert_element(ir.Constant(_F32X16, None), x, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))

        y = builder.fmul(builder.sitofp(v_a, _F32X16), builder.load(ptr(3, 6), align=4))
        y = builder.select(flag(ROWS), builder.fmul(y, splat(rs_a)), y)
        y = builder.select(flag(BIAS), builder.fadd(y, builder.load(ptr(4, 6), align=4)), y)
        slot = cgutils.alloca_once_value(builder, y)
        with builder.if_then(flag(RESIDUAL)):
            builder.store(builder.fadd(y, builder.load(ptr(5, 1), align=4)), slot)
        y = builder.load(slot)
        low, high = splat(lo_a), splat(hi_a)
        y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
        y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
        builder.store(y, ptr(0, 1), align=4)
        return context.get_dummy_value()

    return types.none(out, idx, v, scale, bias, res, col, mode, lo, hi, row_scale), codegen


simd.pin_uuid(store_epilogue, "gemm_vnni.store_epilogue")


# Module level, not closures of `driver`: Numba keys a cached closure by pickling its cells, and these
# dispatchers pickle differently once compiled, so the core saved under one key and looked up another.
@njit(inline="always")
def taps_sum(psum, tappix, p):
    s = 0
    for t in range(tappix.shape[0]):
        s += psum[p + tappix[t]]
    return s


@njit(inline="always")
def put(mode, out_i, out_f, epi, tmp, row, col, n, v):
    scale, bias, res, lo, hi = epi
    row_scale = res[row] if mode & ROWS else np.float32(1)
    if col + LANES <= n:
        if mode == INT32:
            store_i32x16(out_i, row * n + col, v)
        else:
            store_epilogue(out_f, row * n + col, v, scale, bias, res, col, mode, lo, hi, row_scale)
    else:
        store_i32x16(tmp, 0, v)
        for q in range(n - col):
            at = row * n + col + q
            if mode == INT32:
                out_i[at] = tmp[q]
            else:
                y = np.float32(tmp[q]) * scale[col + q]
                if mode & ROWS:
                    y = y * row_scale
                if mode & BIAS:
                    y = y + bias[col + q]
                if mode & RESIDUAL:
                    y = y + res[at]
                if y < lo:
                    y = lo
                if y > hi:
                    y = hi
                out_f[at] = y


@njit(inline="always")
def finish(mode, out_i, out_f, epi, tmp, cw, i, rows, col, n, s, v0, v1, v2, v3):
    c = load_i32x16(cw, col)
    put(mode, out_i, out_f, epi, tmp, i, col, n, add_i32x16(add_i32x16(v0, c), splat_i32x16(-s[0])))
    if rows > 1:
        put(mode, out_i, out_f, epi, tmp, i + 1, col, n, add_i32x16(add_i32x16(v1, c), splat_i32x16(-s[1])))
    if rows > 2:
        put(mode, out_i, out_f, epi, tmp, i + 2, col, n, add_i32x16(add_i32x16(v2, c), splat_i32x16(-s[2])))
    if rows > 3:
        put(mode, out_i, out_f, epi, tmp, i + 3, col, n, add_i32x16(add_i32x16(v3, c), splat_i32x16(-s[3])))


simd.pin_kernels("gemm_vnni", taps_sum, put, finish)


@functools.cache
def driver():
    """The implicit GEMM over (row tile, 64-channel tile) tasks (module docstring); run it inside
    ``threads_if(parallel)``."""

    def core(a8, psum, tapoff, tappix, wp, cw, offset, m, n, n_pad, cq, ps, geo, mode, out_i, out_f, scale, bias, res,
             lo, hi):
        epi = (scale, bias, res, lo, hi)
        ho, wo, hp, wpad, sh, sw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
        hw = ho * wo
        ntaps = tapoff.shape[0]
        ws = ntaps * cq * 64  # bytes per 16-channel block
        nblk = n_pad // LANES
        ntiles = (nblk + 3) // 4
        mtiles = (m + MT - 1) // MT
        for t in prange(ntiles * mtiles):
            nt = t // mtiles
            mt = t - nt * mtiles
            b0 = nt * 4
            b1 = min(nblk, b0 + 4)
            o1, o2, o3 = min(1, b1 - b0 - 1) * ws, min(2, b1 - b0 - 1) * ws, min(3, b1 - b0 - 1) * ws
            tmp = np.empty(LANES, dtype=np.int32)
            s = np.zeros(4, dtype=np.int64)
            pb, poh, pw = first_pixel(mt * MT, hw, wo)
            for i in range(mt * MT, min(m, mt * MT + MT), 4):
                rows = min(4, m - i)
                p0, p1, p2, p3, pb, poh, pw = four_pixels(pb, poh, pw, rows, ho, wo, hp, wpad, sh, sw)
                if offset != 0:
                    s[0] = offset * taps_sum(psum, tappix, p0)
                    s[1] = offset * taps_sum(psum, tappix, p1)
                    s[2] = offset * taps_sum(psum, tappix, p2)
                    s[3] = offset * taps_sum(psum, tappix, p3)
                a0, a1, a2, a3 = p0 * ps, p1 * ps, p2 * ps, p3 * ps
                # a partial tile (n_pad not a multiple of 64) re-reads its last block in the missing
                # slots and stores only its own: one loop body (the per-block loop it replaced ran
                # 3-6x slower per block, 1x1 conv 112x112 16 -> 96: 6.3 ms vs 2.0 ms for 16 -> 128)
                z = zero_i32x16()
                c00, c01, c02, c03, c10, c11, c12, c13 = z, z, z, z, z, z, z, z
                c20, c21, c22, c23, c30, c31, c32, c33 = z, z, z, z, z, z, z, z
                for tap in range(ntaps):
                    d = tapoff[tap]
                    wb = b0 * ws + tap * cq * 64
                    for q in range(cq):
                        wq = wb + q * 64
                        w0 = load_i8x64(wp, wq)
                        w1 = load_i8x64(wp, wq + o1)
                        w2 = load_i8x64(wp, wq + o2)
                        w3 = load_i8x64(wp, wq + o3)
                        x = bcast4_i8x64(a8, a0 + d + 4 * q)
                        c00, c01, c02, c03 = (dpbusd512(c00, w0, x), dpbusd512(c01, w1, x),
                                              dpbusd512(c02, w2, x), dpbusd512(c03, w3, x))
                        x = bcast4_i8x64(a8, a1 + d + 4 * q)
                        c10, c11, c12, c13 = (dpbusd512(c10, w0, x), dpbusd512(c11, w1, x),
                                              dpbusd512(c12, w2, x), dpbusd512(c13, w3, x))
                        x = bcast4_i8x64(a8, a2 + d + 4 * q)
                        c20, c21, c22, c23 = (dpbusd512(c20, w0, x), dpbusd512(c21, w1, x),
                                              dpbusd512(c22, w2, x), dpbusd512(c23, w3, x))
                        x = bcast4_i8x64(a8, a3 + d + 4 * q)
                        c30, c31, c32, c33 = (dpbusd512(c30, w0, x), dpbusd512(c31, w1, x),
                                              dpbusd512(c32, w2, x), dpbusd512(c33, w3, x))
                col = b0 * LANES
                finish(mode, out_i, out_f, epi, tmp, cw, i, rows, col, n, s, c00, c10, c20, c30)
                if b1 - b0 > 1:
                    finish(mode, out_i, out_f, epi, tmp, cw, i, rows, col + 16, n, s, c01, c11, c21, c31)
                if b1 - b0 > 2:
                    finish(mode, out_i, out_f, epi, tmp, cw, i, rows, col + 32, n, s, c02, c12, c22, c32)
                if b1 - b0 > 3:
                    finish(mode, out_i, out_f, epi, tmp, cw, i, rows, col + 48, n, s, c03, c13, c23, c33)

    return simd.pin_uuid(njit(parallel=True, cache=True)(core), "gemm_vnni.core")


@contextlib.contextmanager
def threads_if(parallel: bool) -> Iterator[None]:
    """Numba's threads for the block if ``parallel``, else one. Serial GEMMs run the parallel
    driver on one thread: compiled without ``prange`` (the task body inlined into one loop nest
    that spills its registers), the same code ran 3-20x slower (1x1 conv 56x56, 64 -> 256:
    8.7 ms against 0.53 ms)."""
    if parallel:
        yield
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


NO_F32 = np.zeros(LANES, dtype=np.float32)
NO_I32 = np.zeros(LANES, dtype=np.int32)


def run(a8: np.ndarray, asum: np.ndarray, w: PackedWeight, shift: int, m: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` = the exact int32 product of one group (``a8`` rows of ``w.k_pad`` bytes, pad columns
    zero, ``asum`` their sums)."""
    blocks = weight_blocks(w)
    cw = (shift * blocks.cw_base).astype(np.int32)
    with threads_if(parallel):
        driver()(a8, asum, ONE_TAP, ONE_TAP, blocks.data, cw, blocks.offset, m, w.n, blocks.n_pad, blocks.cq,
                 w.k_pad, GEMM_GEO, INT32, out.reshape(-1), NO_F32, NO_F32, NO_F32, NO_F32, *NO_CLAMP)


def conv_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
              scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple,
              parallel: bool) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], None]:
    """``conv`` with every argument that is the same from call to call bound once: ``run(a8, psum, y,
    residual)``. A compiled model calls a layer at one shape over and over, and building the ~20
    arguments took as long as a small layer's GEMM."""
    off, pix, data, cw, offset, n, n_pad, cq, c4, geo = conv_launch(w, shift, c, geom, hp, wpad)
    mode = (SCALED if bias is None else SCALED_BIASED) | (RESIDUAL if residual else 0)
    core = driver()
    head = (off, pix, data, cw, offset, m, n, n_pad, cq, c4, geo, mode, NO_I32)
    tail = (np.float32(clamp[0]), np.float32(clamp[1]))
    bias_arg = scale if bias is None else bias

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None) -> None:
        args = (a8, psum, *head, y.reshape(-1), scale, bias_arg, NO_F32 if res is None else res.reshape(-1), *tail)
        if parallel:
            core(*args)
            return
        with threads_if(False):
            core(*args)

    return run


def conv(a8: np.ndarray, psum: np.ndarray, w: PackedWeight, shift: int, c: int, geom: tuple[int, ...],
         hp: int, wpad: int, m: int, scale: np.ndarray, bias: np.ndarray | None, y: np.ndarray,
         parallel: bool, residual: np.ndarray | None = None, clamp: tuple = NO_CLAMP) -> None:
    """``y`` (m, n) float32 = the dequantized conv of padded NHWC shifted codes ``a8`` (``hp x wpad``
    pixels of ``c4`` bytes, per-pixel sums ``psum``); ``geom`` from ``conv.conv_geometry``. Then
    ``+ residual`` (float32, ``y``'s layout) and clamped to ``clamp`` = float32 ``(lo, hi)``."""
    conv_gemm(w, shift, c, geom, hp, wpad, m, scale, bias, residual is not None, clamp, parallel)(a8, psum, y, residual)
