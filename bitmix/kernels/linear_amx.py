"""One Numba call per quantized linear on the AMX tile engine: float rows in, float rows out (issue 15).

``linear_vnni`` for Sapphire Rapids and later: the same quantize pass (``broadcast``'s, or ``row_steps``'
for per-row steps and online rotation) writes the signed-byte rows, here in ``amx``'s layout (rows of K
rounded up to 64 bytes; pad rows up to a 32-row block are never written out, so they may hold anything),
then ``tdpbssd`` multiplies them by the weight's tiles (``amx.weight_tiles``) 32 x 32 outputs at a time,
and each block's epilogue writes ``float32(acc) * scale (* row step) (+ bias)`` with ``gemm_vnni``'s
``store_epilogue`` -- the reference's float ops in its order, so outputs are bit-identical to every other
engine's. Through ``quant.qlinear`` (separate quantize, pad and dequantize passes, int32 written and read
back) the engine lost to the fused vpdpbusd linear below 64 rows and 2^26 MACs; fused, it wins from 16 rows
(``routing.AMX_FUSED_MIN_M``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from bitmix.kernels import amx, broadcast, gemm_vnni, row_steps, simd
from bitmix.kernels.amx import (
    BLOCK,
    TILE_K,
    dot00,
    dot01,
    dot10,
    dot11,
    load_a0,
    load_a1,
    load_b0,
    load_b1,
    store_c00,
    store_c01,
    store_c10,
    store_c11,
    tile_config,
    tile_release,
    zero_c00,
    zero_c01,
    zero_c10,
    zero_c11,
)
from bitmix.kernels.gemm_vnni import load_f32_bits, store_epilogue
from bitmix.kernels.scratch import scratch
from bitmix.kernels.simd import add_i32x16, load_i32x16
from bitmix.kernels.threads import thread_count

_quantize = _quantize_one = _gemm = None  # what ``_fused``/``_fused_rows`` call, bound once (``simd.cache_variant``)


def _gemm_epilogue(a8, kp, tiles, m, n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, out):
    """``out[i, j] = float32(a8[i] . tiles[j] + cw[j]) * scale[j] (* steps[i]) (+ bias[j])`` (``mode``:
    ``gemm_vnni``'s SCALED / ROWS / BIAS), tasks of ``m_step x n_step`` 32 x 32 blocks (``amx.task_grid``)."""
    nkb = kp // TILE_K
    mblocks = (m + BLOCK - 1) // BLOCK
    nblocks = (n + BLOCK - 1) // BLOCK
    tm = (mblocks + m_step - 1) // m_step
    tn = (nblocks + n_step - 1) // n_step
    panel = nkb * 1024  # bytes of one 16-column weight panel
    lo, hi = gemm_vnni.NO_CLAMP
    for t in prange(tm * tn):
        tile_config(cfg)
        acc = np.empty(BLOCK * BLOCK, dtype=np.int32)
        tni = t // tm
        tmi = t - tni * tm
        m0 = tmi * m_step
        n0 = tni * n_step
        cm = min(mblocks, m0 + m_step) - m0
        cn = min(nblocks, n0 + n_step) - n0
        for q in range(cm * cn):
            if rows_outer:
                mb = m0 + q // cn
                nb = n0 + q % cn
            else:
                nb = n0 + q // cm
                mb = m0 + q % cm
            j0 = nb * BLOCK
            b0 = 2 * nb * panel
            i0 = mb * BLOCK
            zero_c00()
            zero_c01()
            zero_c10()
            zero_c11()
            for kb in range(nkb):
                load_a0(a8, i0 * kp + kb * TILE_K, kp)
                load_a1(a8, (i0 + 16) * kp + kb * TILE_K, kp)
                load_b0(tiles, b0 + kb * 1024, TILE_K)
                load_b1(tiles, b0 + panel + kb * 1024, TILE_K)
                dot00()
                dot01()
                dot10()
                dot11()
            store_c00(acc, 0, BLOCK * 4)
            store_c01(acc, 16, BLOCK * 4)
            store_c10(acc, 16 * BLOCK, BLOCK * 4)
            store_c11(acc, 16 * BLOCK + 16, BLOCK * 4)
            rows = min(m, i0 + BLOCK) - i0
            for half in range(2):
                col = j0 + 16 * half
                if col >= n:
                    break
                count = min(16, n - col)
                c = load_i32x16(cw, col)
                sv = load_f32_bits(scale, col, count)
                bv = load_f32_bits(bias, col, count)
                for r in range(rows):
                    row = i0 + r
                    row_scale = steps[row] if mode & gemm_vnni.ROWS else np.float32(1)
                    v = add_i32x16(load_i32x16(acc, r * BLOCK + 16 * half), c)
                    store_epilogue(out, row * n + col, v, sv, bv, steps, mode, lo, hi, row_scale, count)
        tile_release()


def _fused(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum, tiles, cw, n, cfg, m_step, n_step, rows_outer,
           mode, scale, bias, steps, out, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    else:
        nan = _quantize(x, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum)
    if nan:
        return True
    _gemm(a8, kp, tiles, x.shape[0], n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, out)
    return False


def _fused_rows(x, a_scale, has_scale, step, floor, lo, hi, shift, signs, block, kp, a8, asum, tiles, cw, n, cfg,
                m_step, n_step, rows_outer, mode, scale, bias, steps, out, one):
    if one:
        nan = _quantize_one(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    else:
        nan = _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block)
    if nan:
        return True
    _gemm(a8, kp, tiles, x.shape[0], n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, steps, out)
    return False


@functools.cache
def _gemm_driver():
    fn = njit(parallel=True, cache=True)(_gemm_epilogue)
    return simd.pin_uuid(fn, "linear_amx.gemm")


@functools.cache
def driver():
    """The fused kernel: ``broadcast``'s quantize pass, then the tile GEMM and its epilogue, in one call."""
    fn = simd.cache_variant(_fused, "amx", _quantize=broadcast.quantize_rows(True),
                            _quantize_one=broadcast.quantize_rows(False), _gemm=_gemm_driver())
    return simd.pin_uuid(njit(cache=True)(fn), "linear_amx.fused")


@functools.cache
def driver_rows():
    """The fused kernel of a per-row-step layer: ``row_steps``' quantize pass, the GEMM, the row scales."""
    fn = simd.cache_variant(_fused_rows, "amx", _quantize=row_steps.quantize_pass(True),
                            _quantize_one=row_steps.quantize_pass(False), _gemm=_gemm_driver())
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
        grid = (self.tiles, self.cw, w.n, amx.tile_palette(), m_step, n_step, rows_outer)
        if self.row_floor is not None:
            steps = scratch("linear.row_steps", m, np.float32)
            mode = gemm_vnni.SCALED | gemm_vnni.ROWS | (gemm_vnni.BIAS if self.has_bias else 0)
            args = (x, self.a_scale, self.has_scale, self.step, self.row_floor, self.lo, self.hi, self.shift,
                    self.signs, self.block, kp, a8, asum, *grid, mode, self.scale, self.bias, steps, out.reshape(-1),
                    m * w.k <= broadcast.SERIAL_QUANTIZE_MAX)
            kernel = driver_rows()
        else:
            mode = gemm_vnni.SCALED_BIASED if self.has_bias else gemm_vnni.SCALED
            args = (x, self.a_scale, self.has_scale, self.step, self.lo, self.hi, self.shift, kp, a8, asum, *grid,
                    mode, self.scale, self.bias, gemm_vnni.NO_F32, out.reshape(-1),
                    m * w.k <= broadcast.SERIAL_QUANTIZE_MAX)
            kernel = driver()
        if parallel:
            return kernel(*args)
        with gemm_vnni.threads_if(False):
            return kernel(*args)
