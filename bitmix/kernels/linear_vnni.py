"""One Numba call per quantized linear on the AVX-512 VNNI path: float rows in, float rows out (issue 15).

``quant.qlinear`` runs a linear as four passes with Python between them (quantize to codes,
shift and sum the codes, the int32 GEMM, dequantize); on MiniLM (64 tokens, 48 linears of a few
million MACs each) those passes and the calls around them cost several times the GEMM. Here one
kernel does all of it:

1. rows of ``x`` (times the per-input-channel smoothing scale, when the layer has one) are
   quantized straight into the signed-byte, zero-padded rows the VNNI kernel reads, with their
   row sums (``codes = rint(clip(x * a_scale / step, lo, hi))`` in float32, as ``quant``);
2. ``gemm_vnni``'s register-blocked core -- the one the implicit-GEMM convs run, on its one-tap
   plain-GEMM geometry -- multiplies them with the weight in its broadcast layout;
3. its epilogue writes ``float32(acc) * scale + bias`` (``scale = float32(a_step) * w_scales``).

Same float formulas and exact int32 products as ``quant.qlinear``, so outputs are bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from bitmix.kernels import gemm_vnni, simd
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.scratch import scratch

QROWS = 16  # rows per task of the quantize pass


@functools.cache
def driver():
    """The fused kernel: the quantize pass, then ``gemm_vnni.driver()`` in the same call (run it
    inside ``gemm_vnni.threads_if``)."""

    def quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
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
                        seen |= v != v  # branch-free flag keeps the loop vectorised; NaN codes are discarded
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

    quantize_rows = simd.pin_uuid(njit(parallel=True, cache=True)(quantize), "linear_vnni.quantize")
    core = gemm_vnni.driver()

    def fused(x, a_scale, has_scale, step, lo, hi, shift, wp, cw, offset, n, n_pad, cq, kp, mode, scale, bias,
              a8, asum, out, one_tap, geo, no_i32, lo_f, hi_f):
        if quantize_rows(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
            return True
        core(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, mode, no_i32, out,
             scale, bias, out, lo_f, hi_f)
        return False

    return simd.pin_uuid(njit(cache=True)(fused), "linear_vnni.fused")


class FusedLinear:
    """A layer's constant operands for ``driver``, prepared once (at lowering) so a call only checks ``x``.

    ``w_scales``/``bias`` are float32 ``(n,)``, ``a_scale`` float32 ``(k,)`` or None; the
    caller (``quant.fused_linear``) has validated them.
    """

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: np.float32, lo: int, hi: int, shift: int,
                 bias: np.ndarray | None, a_scale: np.ndarray | None) -> None:
        self.w = w
        self.blocks = gemm_vnni.channel_blocks(w)
        self.cw = (shift * self.blocks.cw_base).astype(np.int32)
        self.step = np.float32(a_step)
        self.lo, self.hi, self.shift = lo, hi, shift
        self.scale = (self.step * w_scales).astype(np.float32)
        self.mode = gemm_vnni.SCALED if bias is None else gemm_vnni.SCALED_BIASED
        self.bias = np.ascontiguousarray(bias, dtype=np.float32) if bias is not None else self.scale
        self.has_scale = a_scale is not None
        self.a_scale = (np.ascontiguousarray(a_scale, dtype=np.float32) if a_scale is not None
                        else np.ones(w.k, dtype=np.float32))

    def __call__(self, x: np.ndarray, out: np.ndarray, parallel: bool) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K); True on NaN."""
        m = x.shape[0]
        w, b = self.w, self.blocks
        a8 = scratch("linear.a8", m * w.k_pad, np.int8)
        asum = scratch("linear.asum", m, np.int64)
        with gemm_vnni.threads_if(parallel):
            return driver()(x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift, b.data, self.cw,
                            b.offset, w.n, b.n_pad, b.cq, w.k_pad, self.mode, self.scale, self.bias, a8, asum,
                            out.reshape(-1), gemm_vnni.ONE_TAP, gemm_vnni.GEMM_GEO, gemm_vnni.NO_I32,
                            *gemm_vnni.NO_CLAMP)
