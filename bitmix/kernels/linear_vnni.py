"""One Numba call per quantized linear on the AVX-512 VNNI path: float rows in, float rows out (issue 15).

``quant.qlinear`` runs a linear as four passes with Python between them (quantize to codes,
shift and sum the codes, the int32 GEMM, dequantize); on MiniLM (64 tokens, 48 linears of a few
million MACs each) those passes and the calls around them cost several times the GEMM. Here one
kernel does all of it:

1. rows of ``x`` (times the per-input-channel smoothing scale, when the layer has one) are
   quantized straight into the signed-byte, zero-padded rows the VNNI kernel reads, with their
   row sums (``codes = rint(clip(x * a_scale / step, lo, hi))`` in float32, as ``quant``);
2. the register-blocked broadcast GEMM of ``gemm_vnni`` (4 rows x 64 channels in zmm
   accumulators over its ``[n/16][k/4][16][4]`` weight layout) runs on them;
3. its epilogue writes ``float32(acc) * scale + bias`` (``scale = float32(a_step) * w_scales``).

Same float formulas and exact int32 products as ``quant.qlinear``, so outputs are bit-identical.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from bitmix.kernels import simd
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.scratch import scratch
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
MT = 64  # activation rows per parallel task of the GEMM
QROWS = 16  # rows per task of the quantize pass
_BLOCKS: weakref.WeakKeyDictionary[PackedWeight, tuple[np.ndarray, int, np.ndarray]] = weakref.WeakKeyDictionary()


def channel_blocks(w: PackedWeight) -> tuple[np.ndarray, int, np.ndarray]:
    """``(data, n_pad, row_sums)``: ``w`` re-laid as ``[n_pad/16][k_pad/4][16][4]`` bytes (one byte per
    code: ``code + offset`` for 2/4-bit, the signed code for 8-bit; pad bytes 0), built once per weight.
    The layout of ``gemm_vnni`` (MLAS/oneDNN style), kept here so linears do not follow conv changes."""
    blocks = _BLOCKS.get(w)
    if blocks is None:
        codes = unpack_weights(w).astype(np.int16) + w.offset
        n_pad = -(-w.n // LANES) * LANES
        full = np.zeros((n_pad, w.k_pad), dtype=np.uint8)
        full[: w.n, : w.k] = codes.astype(np.int8).view(np.uint8) if w.bits == 8 else codes.astype(np.uint8)
        data = full.reshape(n_pad // LANES, LANES, w.k_pad // 4, 4).transpose(0, 2, 1, 3).reshape(-1)
        sums = np.zeros(n_pad, dtype=np.int32)
        sums[: w.n] = w.row_sums
        blocks = _BLOCKS[w] = (np.ascontiguousarray(data), n_pad, sums)
    return blocks
_F32X16 = ir.VectorType(ir.FloatType(), 16)


def _f32_ptr(context, builder, arr_type, arr, idx, idx_type):
    ary = context.make_array(arr_type)(context, builder, value=arr)
    pos = context.cast(builder, idx, idx_type, types.intp)
    return builder.bitcast(builder.gep(ary.data, [pos]), _F32X16.as_pointer())


@intrinsic
def scale_store(typingctx, out, at, v, scale, bias, col, has_bias):
    """``out[at:at+16] = float32(v) * scale[col:col+16] (+ bias[col:col+16])``: one ``vcvtdq2ps``, a
    ``vmulps`` and a ``vaddps`` (never fused into an FMA: the reference rounds the product first)."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == f32 and scale == f32 and bias == f32 and v == i32x16 and isinstance(at, types.Integer)
            and isinstance(col, types.Integer) and isinstance(has_bias, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        out_a, at_a, v_a, scale_a, bias_a, col_a, has_bias_a = args
        y = builder.fmul(builder.sitofp(v_a, _F32X16),
                         builder.load(_f32_ptr(context, builder, sig.args[3], scale_a, col_a, sig.args[5]), align=4))
        with_bias = builder.fadd(y, builder.load(_f32_ptr(context, builder, sig.args[4], bias_a, col_a, sig.args[5]),
                                                 align=4))
        y = builder.select(has_bias_a, with_bias, y)
        builder.store(y, _f32_ptr(context, builder, sig.args[0], out_a, at_a, sig.args[1]), align=4)
        return context.get_dummy_value()

    return types.none(out, at, v, scale, bias, col, has_bias), codegen


simd.pin_uuid(scale_store, "linear_vnni.scale_store")


@functools.cache
def driver(w8: bool, parallel: bool):
    """The fused kernel; ``w8``: signed 8-bit weights, so the activations are stored as vpdpbusd's
    unsigned operand (``code + 128``, corrected through ``cw``). Flipping them inside the K loop
    instead, as ``gemm_vnni`` would, took LLVM over ten minutes to compile."""

    @njit(inline="always")
    def dp(acc, wv, av):
        if w8:  # the quantize pass stored the activations as unsigned bytes (code + 128)
            return dpbusd512(acc, av, wv)
        return dpbusd512(acc, wv, av)

    @njit(inline="always")
    def put(out, tmp, scale, bias, has_bias, row, col, n, v):
        base = row * n + col
        if col + LANES <= n:
            scale_store(out, base, v, scale, bias, col, has_bias)
        else:
            store_i32x16(tmp, 0, v)
            for q in range(n - col):
                y = np.float32(tmp[q]) * scale[col + q]
                if has_bias:
                    y = y + bias[col + q]
                out[base + q] = y

    @njit(inline="always")
    def finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, col, n, v0, v1, v2, v3):
        c = load_i32x16(cw, col)
        put(out, tmp, scale, bias, has_bias, i, col, n, add_i32x16(add_i32x16(v0, c), splat_i32x16(-offset * asum[i])))
        if rows > 1:
            v = add_i32x16(add_i32x16(v1, c), splat_i32x16(-offset * asum[i + 1]))
            put(out, tmp, scale, bias, has_bias, i + 1, col, n, v)
        if rows > 2:
            v = add_i32x16(add_i32x16(v2, c), splat_i32x16(-offset * asum[i + 2]))
            put(out, tmp, scale, bias, has_bias, i + 2, col, n, v)
        if rows > 3:
            v = add_i32x16(add_i32x16(v3, c), splat_i32x16(-offset * asum[i + 3]))
            put(out, tmp, scale, bias, has_bias, i + 3, col, n, v)

    def quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
        m, k = x.shape
        flo = np.float32(lo)
        fhi = np.float32(hi)
        sh = np.int32(shift)
        flip = np.int32(128 if w8 else 0)
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
                        seen |= v != v  # branch-free flag keeps the loop vectorised; NaN codes are discarded
                        code = np.int32(np.rint(min(max(v, flo), fhi))) - sh
                        a8[np.uintp(base + q)] = code + flip
                        s += code
                else:
                    for q in range(k):
                        v = src[np.uintp(q)] / step
                        seen |= v != v
                        code = np.int32(np.rint(min(max(v, flo), fhi))) - sh
                        a8[np.uintp(base + q)] = code + flip
                        s += code
                for q in range(k, kp):
                    a8[np.uintp(base + q)] = flip  # code 0 in the unsigned view
                asum[i] = s
            nan[t] = seen
        return nan.any()

    def gemm(a8, asum, wp, cw, offset, m, n, n_pad, kp, scale, bias, has_bias, out):
        kq4 = kp // 4
        ws = kq4 * 64  # bytes per 16-channel block
        nblk = n_pad // LANES
        ntiles = (nblk + 3) // 4
        mtiles = (m + MT - 1) // MT
        for t in prange(ntiles * mtiles):
            nt = t // mtiles
            mt = t - nt * mtiles
            b0 = nt * 4
            b1 = min(nblk, b0 + 4)
            tmp = np.empty(LANES, dtype=np.int32)
            for i in range(mt * MT, min(m, mt * MT + MT), 4):
                rows = min(4, m - i)
                a0 = i * kp
                if b1 - b0 == 4:
                    z = zero_i32x16()
                    c00, c01, c02, c03, c10, c11, c12, c13 = z, z, z, z, z, z, z, z
                    c20, c21, c22, c23, c30, c31, c32, c33 = z, z, z, z, z, z, z, z
                    wb = b0 * ws
                    for q in range(kq4):
                        wo = wb + q * 64
                        w0 = load_i8x64(wp, wo)
                        w1 = load_i8x64(wp, wo + ws)
                        w2 = load_i8x64(wp, wo + 2 * ws)
                        w3 = load_i8x64(wp, wo + 3 * ws)
                        xv = bcast4_i8x64(a8, a0 + 4 * q)
                        c00, c01, c02, c03 = dp(c00, w0, xv), dp(c01, w1, xv), dp(c02, w2, xv), dp(c03, w3, xv)
                        xv = bcast4_i8x64(a8, a0 + kp + 4 * q)
                        c10, c11, c12, c13 = dp(c10, w0, xv), dp(c11, w1, xv), dp(c12, w2, xv), dp(c13, w3, xv)
                        xv = bcast4_i8x64(a8, a0 + 2 * kp + 4 * q)
                        c20, c21, c22, c23 = dp(c20, w0, xv), dp(c21, w1, xv), dp(c22, w2, xv), dp(c23, w3, xv)
                        xv = bcast4_i8x64(a8, a0 + 3 * kp + 4 * q)
                        c30, c31, c32, c33 = dp(c30, w0, xv), dp(c31, w1, xv), dp(c32, w2, xv), dp(c33, w3, xv)
                    col = b0 * LANES
                    finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, col, n, c00, c10, c20, c30)
                    finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, col + 16, n, c01, c11, c21,
                           c31)
                    finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, col + 32, n, c02, c12, c22,
                           c32)
                    finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, col + 48, n, c03, c13, c23,
                           c33)
                else:
                    for b in range(b0, b1):
                        z = zero_i32x16()
                        c0, c1, c2, c3 = z, z, z, z
                        wb = b * ws
                        for q in range(kq4):
                            w0 = load_i8x64(wp, wb + q * 64)
                            c0 = dp(c0, w0, bcast4_i8x64(a8, a0 + 4 * q))
                            c1 = dp(c1, w0, bcast4_i8x64(a8, a0 + kp + 4 * q))
                            c2 = dp(c2, w0, bcast4_i8x64(a8, a0 + 2 * kp + 4 * q))
                            c3 = dp(c3, w0, bcast4_i8x64(a8, a0 + 3 * kp + 4 * q))
                        finish(out, tmp, cw, asum, offset, scale, bias, has_bias, i, rows, b * LANES, n, c0, c1, c2,
                               c3)

    tag = f"linear_vnni.{'w8' if w8 else 'wq'}"
    simd.pin_kernels(tag, dp, put, finish)
    variant = "parallel" if parallel else "serial"
    # Two functions, not one: compiled as one serial body, the GEMM ran at half speed (register pressure).
    quantize_rows = njit(parallel=parallel)(simd.cache_variant(quantize, variant))
    gemm_tiles = njit(parallel=parallel)(simd.cache_variant(gemm, variant))
    simd.pin_uuid(quantize_rows, f"{tag}.quantize.{variant}")
    simd.pin_uuid(gemm_tiles, f"{tag}.gemm.{variant}")

    def fused(x, a_scale, has_scale, step, lo, hi, shift, wp, cw, offset, n, n_pad, kp, scale, bias, has_bias,
              a8, asum, out):
        if quantize_rows(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
            return True
        gemm_tiles(a8, asum, wp, cw, offset, x.shape[0], n, n_pad, kp, scale, bias, has_bias, out)
        return False

    fn = njit(cache=True)(simd.cache_variant(fused, variant))
    simd.pin_uuid(fn, f"{tag}.fused.{variant}")
    return fn


class FusedLinear:
    """A layer's constant operands for ``driver``, prepared once (at lowering) so a call only checks ``x``.

    ``w_scales``/``bias`` are float32 ``(n,)``, ``a_scale`` float32 ``(k,)`` or None; the
    caller (``quant.fused_linear``) has validated them.
    """

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: np.float32, lo: int, hi: int, shift: int,
                 bias: np.ndarray | None, a_scale: np.ndarray | None) -> None:
        self.w = w
        self.data, self.n_pad, row_sums = channel_blocks(w)
        self.cw = ((shift - (128 if w.bits == 8 else 0)) * row_sums).astype(np.int32)
        self.step = np.float32(a_step)
        self.lo, self.hi, self.shift = lo, hi, shift
        self.scale = (self.step * w_scales).astype(np.float32)
        self.has_bias = bias is not None
        self.bias = np.ascontiguousarray(bias, dtype=np.float32) if bias is not None else self.scale
        self.has_scale = a_scale is not None
        self.a_scale = (np.ascontiguousarray(a_scale, dtype=np.float32) if a_scale is not None
                        else np.ones(w.k, dtype=np.float32))

    def __call__(self, x: np.ndarray, out: np.ndarray, parallel: bool) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K); True on NaN."""
        m = x.shape[0]
        mp = -(-m // 4) * 4
        a8 = scratch("linear.a8", mp * self.w.k_pad, np.int8)
        asum = scratch("linear.asum", mp, np.int64)
        w = self.w
        return driver(w.bits == 8, parallel)(x, self.a_scale, self.has_scale, self.step, self.lo, self.hi,
                                             self.shift, self.data, self.cw, w.offset, w.n, self.n_pad, w.k_pad,
                                             self.scale, self.bias, self.has_bias, a8, asum, out.reshape(-1))
