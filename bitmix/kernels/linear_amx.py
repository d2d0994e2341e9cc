"""One Numba call per quantized linear on the AMX tile engine: float rows in, float rows out (issue 15).

``linear_vnni`` for Sapphire Rapids and later: the same quantize pass (``broadcast``'s, or ``row_steps``'
for per-row steps and online rotation) writes the signed-byte rows, here in ``amx``'s layout (rows of K
rounded up to 64 bytes; pad rows up to a 32-row block are never written out, so they may hold anything),
then ``conv_amx``'s tile core (a one-tap conv over the rows) multiplies them by the weight's tiles
(``amx.weight_tiles``) 32 x 32 outputs at a time, and each block's epilogue writes ``float32(acc) * scale
(* row step) (+ bias)`` with ``gemm_vnni``'s ``store_epilogue`` -- the reference's float ops in its order, so
outputs are bit-identical to every other engine's. Through ``quant.qlinear`` (separate quantize, pad and
dequantize passes, int32 written and read back) the engine lost to the fused vpdpbusd linear below 64 rows and
2^26 MACs; fused, it wins from 16 rows (``routing.AMX_FUSED_MIN_M``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from bitmix.kernels import amx, broadcast, conv_amx, gemm_vnni, row_steps, simd
from bitmix.kernels.amx import BLOCK
from bitmix.kernels.scratch import scratch
from bitmix.kernels.threads import thread_count

_quantize = _quantize_one = _gemm = None  # what ``_fused``/``_fused_rows`` call, bound once (``simd.cache_variant``)
ONE_TAP = np.zeros(1, dtype=np.int64)  # a plain GEMM: ``conv_amx``'s core with one tap at offset 0


def _fused(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum, tapoff, vgeo, tiles, n, cw, cfg, m_step, n_step,
           rows_outer, mode, scale, bias, steps, lo_f, hi_f, out, out8, cgeo, q8, nan8, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    else:
        nan = _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    if nan:
        return True
    _gemm(a8, kp, tapoff, vgeo, kp, tiles, n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, lo_f,
          hi_f, out, False, out8, cgeo, q8, nan8)
    return False


def _fused_rows(x, a_scale, has_scale, step, floor, lo, hi, shift, signs, block, kp, a8, asum, tapoff, vgeo, tiles, n,
                cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, lo_f, hi_f, out, out8, cgeo, q8, nan8,
                one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    else:
        nan = _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    if nan:
        return True
    _gemm(a8, kp, tapoff, vgeo, kp, tiles, n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, lo_f,
          hi_f, out, False, out8, cgeo, q8, nan8)
    return False


@functools.cache
def driver():
    """The fused kernel: ``broadcast``'s quantize pass, then the tile GEMM and its epilogue, in one call."""
    fn = simd.cache_variant(_fused, "amx", _quantize=broadcast.quantize_rows(True),
                            _quantize_one=broadcast.quantize_rows(False), _gemm=conv_amx.driver())
    return simd.pin_uuid(njit(cache=True)(fn), "linear_amx.fused")


@functools.cache
def driver_rows():
    """The fused kernel of a per-row-step layer: ``row_steps``' quantize pass, the GEMM, the row scales."""
    fn = simd.cache_variant(_fused_rows, "amx", _quantize=row_steps.quantize_pass(True),
                            _quantize_one=row_steps.quantize_pass(False), _gemm=conv_amx.driver())
    return simd.pin_uuid(njit(cache=True)(fn), "linear_amx.fused_rows")


class AmxLinear(broadcast.LinearOperands):
    """The fused AMX linear of a layer: ``broadcast.LinearOperands``' scalars, with the weight as tiles."""

    def layout(self) -> None:
        w = self.w
        self.tiles = amx.weight_tiles(w)
        cw = np.zeros(-(-w.n // BLOCK) * BLOCK, dtype=np.int32)  # whole 16-lane loads past n read zeros
        cw[: w.n] = self.shift * w.row_sums
        self.cw = cw
        self.kp = amx.padded_k(w.k)

    def __call__(self, x: np.ndarray, out: np.ndarray, parallel: bool) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K); True on NaN."""
        m = x.shape[0]
        w, kp = self.w, self.kp
        a8 = scratch("linear.a8", -(-m // BLOCK) * BLOCK * kp, np.int8)
        asum = scratch("linear.asum", m, np.int64)
        m_step, n_step, rows_outer = amx.task_grid(m, w.n, 4 * thread_count() if parallel else 1)
        vgeo = np.array((m, m, 1, m, 1), dtype=np.int64)  # m rows of one "image" m x 1
        grid = (ONE_TAP, vgeo, self.tiles, w.n, self.cw, amx.tile_palette(), m_step, n_step, rows_outer)
        one = m * w.k <= broadcast.SERIAL_QUANTIZE_MAX  # the quantize pass on the calling thread
        if self.row_floor is not None:
            steps = scratch("linear.row_steps", m, np.float32)
            mode = gemm_vnni.SCALED | gemm_vnni.ROWS | (gemm_vnni.BIAS if self.has_bias else 0)
            args = (x, self.a_scale, self.has_scale, self.step, self.row_floor, self.lo, self.hi, self.shift,
                    self.signs, self.block, kp, a8, asum, *grid, mode, self.scale, self.bias, steps,
                    *gemm_vnni.NO_CLAMP, out.reshape(-1), *conv_amx.NO_CODES, one)
            kernel = driver_rows()
        else:
            mode = gemm_vnni.SCALED_BIASED if self.has_bias else gemm_vnni.SCALED
            args = (x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift, kp, a8, asum, *grid,
                    mode, self.scale, self.bias, gemm_vnni.NO_F32, *gemm_vnni.NO_CLAMP, out.reshape(-1),
                    *conv_amx.NO_CODES, one)
            kernel = driver()
        if parallel:
            return kernel(*args)
        with gemm_vnni.threads_if(False):
            return kernel(*args)
