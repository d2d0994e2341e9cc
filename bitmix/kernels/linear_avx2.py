"""One Numba call per quantized linear on the AVX2 path: float rows in, float rows out (issue 15).

The AVX2 counterpart of ``linear_vnni``: rows of ``x`` (times the per-input-channel smoothing
scale, when the layer has one) are quantized straight into the signed-byte, zero-padded rows
``gemm_avx2`` reads, with their row sums (``codes = rint(clip(x * a_scale / step, lo, hi))`` in
float32, as ``quant``), then ``gemm_avx2``'s broadcast GEMM runs on them and its epilogue writes
``float32(acc) * scale + bias`` (``scale = float32(a_step) * w_scales``). Same float formulas and
exact int32 products as ``quant.qlinear``, so outputs are bit-identical. A layer with per-row steps
runs ``row_steps``' quantize pass and the GEMM's ``ROWS`` epilogue (as ``linear_vnni``). A residual add after
the linear (a transformer block's ``x + dense(h)``, ``layout.fuse_epilogues``) happens in the same epilogue, the
float32 add torch's would make, so the sum is written once.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from bitmix.kernels import broadcast, gemm_avx2, row_steps, simd
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.scratch import scratch

_quantize = _quantize_one = _gemm = None  # what ``_fused``/``_fused_rows`` call, bound per variant (``cache_variant``)


def _fused(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum, one_tap, geo, wp, cw, offset, n, n_pad, cq,
           no_i32, scale, bias, has_bias, out, res, has_res, chunk, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    else:
        nan = _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    if nan:
        return True
    _gemm(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, gemm_avx2.SCALED, no_i32,
          out, scale, bias, has_bias, gemm_avx2.NO_F32, res, has_res, *gemm_avx2.NO_CLAMP,
          *gemm_avx2.NO_CODES, chunk)
    return False


def _fused_rows(x, a_scale, has_scale, step, floor, lo, hi, shift, steps, signs, block, kp, a8, asum, one_tap, geo,
                wp, cw, offset, n, n_pad, cq, no_i32, scale, bias, has_bias, out, res, has_res, chunk, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    else:
        nan = _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    if nan:
        return True
    _gemm(a8, asum, one_tap, one_tap, wp, cw, offset, x.shape[0], n, n_pad, cq, kp, geo, gemm_avx2.ROWS, no_i32,
          out, scale, bias, has_bias, steps, res, has_res, *gemm_avx2.NO_CLAMP,
          *gemm_avx2.NO_CODES, chunk)
    return False


@functools.cache
def driver(w8: bool, parallel: bool, per_row: bool = False):
    """Quantize, then the ``gemm_avx2`` GEMM with the float epilogue, in one compiled call; ``per_row``:
    ``row_steps``' quantize pass and the GEMM's ``ROWS`` epilogue (``_fused_rows``)."""
    variant = f"{'w8' if w8 else 'wq'}_{'parallel' if parallel else 'serial'}"
    fused, quantize = (_fused_rows, row_steps.quantize_pass) if per_row else (_fused, broadcast.quantize_rows)
    fn = njit(cache=True)(simd.cache_variant(fused, variant, _quantize=quantize(parallel),
                                             _quantize_one=quantize(False), _gemm=gemm_avx2.driver(w8, parallel)))
    return simd.pin_uuid(fn, f"linear_avx2.{fused.__name__.lstrip('_')}.{variant}")


class Avx2Linear(broadcast.LinearOperands):
    """The fused AVX2 linear of a layer (its operands: ``broadcast.LinearOperands``)."""

    def __init__(self, w: PackedWeight, *args: object, **kwargs: object) -> None:
        super().__init__(w, *args, **kwargs)
        self.chunk = gemm_avx2.chunk_steps(w, gemm_avx2.byte_bound(self.lo, self.hi, self.shift))

    def __call__(self, x: np.ndarray, out: np.ndarray, parallel: bool, residual: np.ndarray | None = None) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K), plus ``residual``
        (C-contiguous float32 (M, N)) when given, added in the GEMM's epilogue; True on NaN."""
        m = x.shape[0]
        w, blocks = self.w, self.blocks
        a8 = scratch("linear.a8", m * w.k_pad, np.int8)
        asum = scratch("linear.asum", m, np.int64)
        one = m * w.k <= broadcast.SERIAL_QUANTIZE_MAX  # the quantize pass on the calling thread
        res, has_res = (gemm_avx2.NO_F32, False) if residual is None else (residual.reshape(-1), True)
        if self.row_floor is not None:
            steps = scratch("linear.row_steps", m, np.float32)
            return driver(w.bits == 8, parallel, True)(x, self.a_scale, self.has_scale, self.step, self.row_floor,
                                                      self.lo, self.hi, self.shift, steps, self.signs, self.block,
                                                      w.k_pad, a8, asum, broadcast.ONE_TAP, broadcast.GEMM_GEO,
                                                      blocks.data, self.cw, blocks.offset, w.n, blocks.n_pad,
                                                      blocks.cq, gemm_avx2.NO_I32, self.scale, self.bias,
                                                      self.has_bias, out.reshape(-1), res, has_res, self.chunk, one)
        return driver(w.bits == 8, parallel)(x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift,
                                             w.k_pad, a8, asum, broadcast.ONE_TAP, broadcast.GEMM_GEO, blocks.data,
                                             self.cw, blocks.offset, w.n, blocks.n_pad, blocks.cq, gemm_avx2.NO_I32,
                                             self.scale, self.bias, self.has_bias, out.reshape(-1), res, has_res,
                                             self.chunk, one)
