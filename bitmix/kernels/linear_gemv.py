"""One Numba call per quantized linear of fewer than ``gemm_vnni.MIN_M`` rows (GEMV shapes), on every path.

A classifier head at batch 1 (resnet18 512 -> 1000, mobilenetv2 1280 -> 1000) or a batch-1 decoder's linear
ran ``quant.qlinear``: a quantize pass, ``matmul.gemm``'s checks and shift pass, the tiled GEMV (``tiling``),
a dequantize pass, each its own Numba call (the quantize and dequantize passes a parallel launch each) with
Python between them. A 1280 -> 1000 int8 layer at M = 1 cost 72 us of one thread's time around a 29 us GEMV
(AMD EPYC Zen 3, avx2, 2026-12-07). Here one compiled call does it all:

1. rows of ``x`` -- first rotated (``hadamard.rotate_row``) when the layer has an online rotation, times the
   smoothing scale when it has one -- quantized into zero-padded signed bytes with their sums
   (``broadcast``'s quantize pass; with per-row steps ``row_steps``' pass, the row's step from its max);
2. ``tiling.core_for``'s driver on the path's ``dot1x4``/``dot1x1`` micro-kernels (``isa``), one weight
   pass per row, ``prange`` over weight-row tiles only when ``launch._parallel`` says the size repays it;
3. ``float32(acc) * scale + bias``, with per-row steps ``float32(acc) * w_scales * row_step + bias``.

Same float formulas, in the same order, and exact int32 products as ``quant.qlinear`` (and
``row_steps.divide_rows``/``scale_rows``), so outputs are bit-identical.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from bitmix.kernels import broadcast, row_steps, simd
from bitmix.kernels.hadamard import rotate_row
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.scratch import scratch
from bitmix.kernels.tiling import core_for

_quantize = _core = None  # the kernels ``_gemv``/``_gemv_rows`` call, bound per variant (``simd.cache_variant``)


def _gemv(x, rotated, signs, block, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum, w, wsum, n, acc, scale,
          bias, out):
    m = x.shape[0]
    src = x
    if block > 0:
        for r in range(m):
            rotate_row(x[r], signs, block, rotated[r])
        src = rotated
    if _quantize(src, a_scale, has_scale, step, lo, hi, shift, kp, a8, asum):
        return True
    _core(a8, asum, w, wsum, shift, 1, m, m, n, kp, acc)
    for i in range(m):
        for c in range(n):
            out[i, c] = np.float32(acc[i, c]) * scale[c] + bias[c]
    return False


def _gemv_rows(x, a_scale, has_scale, step, floor, lo, hi, shift, steps, signs, block, kp, a8, asum, w, wsum, n, acc,
               scale, bias, out):
    m = x.shape[0]
    if _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block):
        return True  # a NaN, or a step that overflowed to inf (``row_steps`` flags both)
    _core(a8, asum, w, wsum, shift, 1, m, m, n, kp, acc)
    for i in range(m):
        s = steps[i]
        for c in range(n):
            out[i, c] = np.float32(acc[i, c]) * scale[c] * s + bias[c]
    return False


@functools.cache
def driver(isa: str, bits: int, parallel: bool, per_row: bool):
    """The fused GEMV linear for one (micro-kernel set, weight bits, serial or ``prange`` driver, per-row steps)."""
    variant = f"{isa}_w{bits}_{'parallel' if parallel else 'serial'}"
    fused, quantize = (_gemv_rows, row_steps.quantize_pass) if per_row else (_gemv, broadcast.quantize_rows)
    fn = njit(cache=True)(simd.cache_variant(fused, variant, _quantize=quantize(False),
                                             _core=core_for(bits, isa, parallel)))
    return simd.pin_uuid(fn, f"linear_gemv.{fused.__name__.lstrip('_')}.{variant}")


_NO_ROWS = np.zeros((0, 1), dtype=np.float32)  # ``_gemv``'s rotation buffer when there is no rotation


class GemvLinear:
    """A layer's operands for ``driver``, derived once from ``linear.LinearKernel``'s validated ones;
    ``rotation``: the online rotation's float32 ``(k,)`` signs or None; ``row_floor``: per-row steps or None."""

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: np.float32, lo: int, hi: int, shift: int,
                 bias: np.ndarray | None, a_scale: np.ndarray | None, row_floor: np.float32 | None,
                 rotation: np.ndarray | None) -> None:
        self.w, self.data = w, w.data.reshape(-1)
        self.step = np.float32(a_step)
        self.lo, self.hi, self.shift = lo, hi, shift
        self.row_floor = row_floor
        self.scale = ((self.step if row_floor is None else np.float32(1)) * w_scales).astype(np.float32)
        # none: -0.0s, added unconditionally (``x + -0.0 == x`` bit for bit)
        self.bias = bias if bias is not None else np.full(w.n, -0.0, dtype=np.float32)
        self.has_scale = a_scale is not None
        self.a_scale = a_scale if a_scale is not None else broadcast.NO_SCALE
        self.signs = broadcast.NO_SCALE if rotation is None else rotation
        self.block = 0 if rotation is None else w.k & -w.k

    def __call__(self, x: np.ndarray, out: np.ndarray, isa: str, parallel: bool) -> bool:
        """``out`` (M, N) float32 = the quantized linear of C-contiguous float32 ``x`` (M, K), M < 4, on
        ``isa``'s micro-kernels; True on NaN (or, with per-row steps, Inf)."""
        m = x.shape[0]
        w = self.w
        a8 = scratch("linear_gemv.a8", m * w.k_pad, np.int8)
        asum = scratch("linear_gemv.asum", m, np.int64)
        acc = scratch("linear_gemv.acc", (m, w.n), np.int32)
        if self.row_floor is not None:
            steps = scratch("linear_gemv.row_steps", m, np.float32)
            return driver(isa, w.bits, parallel, True)(x, self.a_scale, self.has_scale, self.step, self.row_floor,
                                                       self.lo, self.hi, self.shift, steps, self.signs, self.block,
                                                       w.k_pad, a8, asum, self.data, w.row_sums, w.n, acc,
                                                       self.scale, self.bias, out)
        rotated = scratch("linear_gemv.rotated", (m, w.k), np.float32) if self.block else _NO_ROWS
        return driver(isa, w.bits, parallel, False)(x, rotated, self.signs, self.block, self.a_scale, self.has_scale,
                                                    self.step, self.lo, self.hi, self.shift, w.k_pad, a8, asum,
                                                    self.data, w.row_sums, w.n, acc, self.scale, self.bias, out)
