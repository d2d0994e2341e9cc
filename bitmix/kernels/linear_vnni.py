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

A layer with per-row steps (``row_steps``) runs ``row_steps``' quantize pass (the row's step from its
max) in place of 1., and the epilogue multiplies by the row's step before the bias (``gemm_vnni.ROWS``):
a separate row-scale pass after the GEMM cost 15-40 us per MiniLM linear, since it read the output
tiles across cores (the GEMM splits 64-row products by columns, the pass by rows).
Same float formulas and exact int32 products as ``quant.qlinear``, so outputs are bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from bitmix.kernels import broadcast, gemm_vnni, row_steps, simd
from bitmix.kernels.scratch import scratch

_quantize = _quantize_one = _core = None  # what ``_fused``/``_fused_rows`` call, bound once (``simd.cache_variant``)


@njit(inline="always")
def _no_codes():
    """The core's code-output arguments, unused by a linear (``gemm_vnni.CODES``)."""
    return np.zeros(16, dtype=np.int8), np.zeros(5, dtype=np.int64), np.ones(4, dtype=np.float32)


simd.pin_kernels("linear_vnni", _no_codes)


def _fused(x, a_scale, has_scale, step, lo, hi, shift, wp, cw, offset, n, n_pad, cq, kp, mode, scale, bias, a8, asum,
           out, one_tap, geo, no_i32, lo_f, hi_f, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    else:
        nan = _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    if nan:
        return True
    _core(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, mode, no_i32, out, scale,
          bias, out, lo_f, hi_f, *_no_codes())
    return False


def _fused_rows(x, a_scale, has_scale, step, floor, lo, hi, shift, steps, signs, block, wp, cw, offset, n, n_pad, cq,
                kp, scale, bias, has_bias, a8, asum, out, one_tap, geo, no_i32, lo_f, hi_f, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    else:
        nan = _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    if nan:
        return True
    mode = gemm_vnni.SCALED | gemm_vnni.ROWS | (gemm_vnni.BIAS if has_bias else 0)
    _core(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, mode, no_i32, out, scale,
          bias, steps, lo_f, hi_f, *_no_codes())
    return False


@functools.cache
def driver():
    """The fused kernel: the quantize pass, then ``gemm_vnni.driver()`` in the same call (run it
    inside ``gemm_vnni.threads_if``)."""
    fn = simd.cache_variant(_fused, "vnni", _quantize=broadcast.quantize_rows(True),
                            _quantize_one=broadcast.quantize_rows(False), _core=gemm_vnni.driver())
    return simd.pin_uuid(njit(cache=True)(fn), "linear_vnni.fused")


@functools.cache
def driver_rows():
    """The fused kernel of a per-row-step layer: ``row_steps``' quantize pass, the GEMM, the row scales."""
    fn = simd.cache_variant(_fused_rows, "vnni", _quantize=row_steps.quantize_pass(True),
                            _quantize_one=row_steps.quantize_pass(False), _core=gemm_vnni.driver())
    return simd.pin_uuid(njit(cache=True)(fn), "linear_vnni.fused_rows")


class FusedLinear(broadcast.LinearOperands):
    """The fused VNNI linear of a layer (its operands: ``broadcast.LinearOperands``)."""

    def __call__(self, x: np.ndarray, out: np.ndarray, parallel: bool) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K); True on NaN."""
        m = x.shape[0]
        w, b = self.w, self.blocks
        a8 = scratch("linear.a8", m * w.k_pad, np.int8)
        asum = scratch("linear.asum", m, np.int64)
        if self.row_floor is not None:
            steps = scratch("linear.row_steps", m, np.float32)
            args = (x, self.a_scale, self.has_scale, self.step, self.row_floor, self.lo, self.hi, self.shift, steps,
                    self.signs, self.block, b.data, self.cw, b.offset, w.n, b.n_pad, b.cq, w.k_pad, self.scale,
                    self.bias, self.has_bias, a8, asum, out.reshape(-1), broadcast.ONE_TAP, broadcast.GEMM_GEO,
                    gemm_vnni.NO_I32, *gemm_vnni.NO_CLAMP, m * w.k <= broadcast.SERIAL_QUANTIZE_MAX)
            kernel = driver_rows()
        else:
            mode = gemm_vnni.SCALED_BIASED if self.has_bias else gemm_vnni.SCALED
            args = (x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift, b.data, self.cw,
                    b.offset, w.n, b.n_pad, b.cq, w.k_pad, mode, self.scale, self.bias, a8, asum, out.reshape(-1),
                    broadcast.ONE_TAP, broadcast.GEMM_GEO, gemm_vnni.NO_I32, *gemm_vnni.NO_CLAMP,
                    m * w.k <= broadcast.SERIAL_QUANTIZE_MAX)
            kernel = driver()
        if parallel:  # the common case without a context manager (~1.5 us a call; MiniLM makes 36)
            return kernel(*args)
        with gemm_vnni.threads_if(False):
            return kernel(*args)
