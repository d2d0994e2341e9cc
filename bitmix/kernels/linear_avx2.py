"""One Numba call per quantized linear on the AVX2 path: float rows in, float rows out (issue 15).

The AVX2 counterpart of ``linear_vnni``: rows of ``x`` (times the per-input-channel smoothing
scale, when the layer has one) are quantized straight into the signed-byte, zero-padded rows
``gemm_avx2`` reads, with their row sums (``codes = rint(clip(x * a_scale / step, lo, hi))`` in
float32, as ``quant``), then ``gemm_avx2``'s broadcast GEMM runs on them and its epilogue writes
``float32(acc) * scale + bias`` (``scale = float32(a_step) * w_scales``). Same float formulas and
exact int32 products as ``quant.qlinear``, so outputs are bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from bitmix.kernels import gemm_avx2, simd
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.scratch import scratch

QROWS = 16  # rows per task of the quantize pass


def _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
    """``a8[i, q] = rint(clip(x[i, q] (* a_scale[q]) / step, lo, hi)) - shift`` (pad columns 0) and
    ``asum[i]`` each row's sum; True if any NaN was seen (NaN codes are discarded)."""
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
def driver(w8: bool, parallel: bool):
    """Quantize, then the ``gemm_avx2`` GEMM with the float epilogue, in one compiled call."""
    variant = "parallel" if parallel else "serial"
    quantize_rows = njit(parallel=parallel, cache=True)(simd.cache_variant(_quantize, variant))
    simd.pin_uuid(quantize_rows, f"linear_avx2.quantize.{variant}")
    gemm = gemm_avx2.driver(w8, parallel)

    def fused(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum, one_tap, geo, wp, cw, offset, n, n_pad, cq,
              no_i32, scale, bias, has_bias, out):
        if quantize_rows(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
            return True
        gemm(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, gemm_avx2.SCALED, no_i32,
             out, scale, bias, has_bias)
        return False

    fn = njit(cache=True)(simd.cache_variant(fused, variant))
    simd.pin_uuid(fn, f"linear_avx2.fused.{'w8' if w8 else 'wq'}.{variant}")
    return fn


class Avx2Linear:
    """A layer's constant operands for ``driver``, prepared once so a call only checks ``x``; the
    caller (``linear.LinearKernel``) has validated them (``w_scales``/``bias`` float32 ``(n,)``,
    ``a_scale`` float32 ``(k,)`` or None)."""

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: np.float32, lo: int, hi: int, shift: int,
                 bias: np.ndarray | None, a_scale: np.ndarray | None) -> None:
        self.w = w
        self.blocks = gemm_avx2.weight_blocks(w)
        self.cw = (shift * self.blocks.cw_base).astype(np.int32)
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
        w, blocks = self.w, self.blocks
        a8 = scratch("linear.a8", m * w.k_pad, np.int8)
        asum = scratch("linear.asum", m, np.int64)
        return driver(w.bits == 8, parallel)(x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift,
                                             w.k_pad, a8, asum, gemm_avx2.ONE_TAP, gemm_avx2.GEMM_GEO, blocks.data,
                                             self.cw, blocks.offset, w.n, blocks.n_pad, blocks.cq, gemm_avx2.NO_I32,
                                             self.scale, self.bias, self.has_bias, out.reshape(-1))
