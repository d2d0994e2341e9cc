"""Per-row activation steps (`bitmix.ir.row_steps`): the row max, division and row-scale epilogue as Numba passes.

The torch form (`row_max`, the step product, a division, then `out * step + bias`) is five small ops
and allocations per call, ~35 us per MiniLM linear (64 x 384 in, 64 x 1536 out; AMD EPYC, 2026-12-04).
These loops compute the same float32 operations in the same order (max of |x| over the row, floored at
`floor`; `step * max`; `x / row_step`; then `out * row_step + bias`), so their bits equal the torch form's.
`divide_rows`/`scale_rows` serve the unfused linears (GEMV shapes, AMX, scalar); `quantize_pass` is the
same arithmetic as the first pass of the fused VNNI/AVX2 linears (`linear_vnni`, `linear_avx2`), whose GEMM
epilogue then multiplies by the row steps (their `ROWS` mode): one Numba call per per-row-step layer.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.broadcast import QROWS
from bitmix.kernels.hadamard import rotate_row
from bitmix.kernels.simd import add_i32x8, hsum_i32x8, zero_i32x8
from bitmix.kernels.simd_f32 import (
    abs_top_u32x8,
    any_i32x8,
    codes_f32x8,
    div_f32x8,
    hmax_u32x8,
    load_f32x8,
    mul_f32x8,
    nan_mask_f32x8,
    splat_f32x8,
    store_f32x8,
    store_i8x8,
)

ABS_BITS = np.uint32(0x7FFFFFFF)
LANES = 8


@njit(inline="always")
def _top(bits):
    """Max of |v| over a 1-D float32 row seen as uint32 bits, as uint32: with the sign cleared the unsigned
    order is the float order and a NaN (above +inf there) wins as in torch's amax; an integer max
    vectorises where a float one with NaN semantics does not (64 x 1536: 8 us vs 55 us)."""
    top = np.uint32(0)
    for c in range(bits.shape[0]):
        v = bits[np.uintp(c)] & ABS_BITS
        top = v if v > top else top
    return top


@njit(cache=True)
def _divide_rows(x, step, floor, out, steps):
    m, k = x.shape
    bits = x.view(np.uint32)
    tops = np.empty(m, np.uint32)
    for r in range(m):
        tops[r] = _top(bits[r])
    magnitudes = tops.view(np.float32)
    for r in range(m):
        s = step * max(magnitudes[r], floor)
        steps[r] = s
        for c in range(k):
            out[r, c] = x[r, c] / s


@njit(cache=True)
def _scale_rows(y, steps, bias, has_bias):
    m, n = y.shape
    for r in range(m):
        s = steps[r]
        if has_bias:
            for c in range(n):
                y[r, c] = y[r, c] * s + bias[c]
        else:
            for c in range(n):
                y[r, c] = y[r, c] * s


_NO_BIAS = np.zeros(1, dtype=np.float32)


def divide_rows(x: np.ndarray, step: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """`x / (step * max(max|x| over the last axis, floor))` and those row steps (shape `x.shape[:-1] + (1,)`)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    steps = np.empty(flat.shape[0], dtype=np.float32)
    _divide_rows(flat, np.float32(step), np.float32(floor), out, steps)
    return out.reshape(x.shape), steps.reshape(*x.shape[:-1], 1)


def scale_rows(y: np.ndarray, steps: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """`y * steps + bias` over float32 `y` (..., N), one step per row; in place when `y` is contiguous."""
    flat = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, y.shape[-1])
    _scale_rows(flat, np.ascontiguousarray(steps, dtype=np.float32).reshape(-1),
                _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32), bias is not None)
    return flat.reshape(y.shape)


@njit(inline="always")
def _scale_into(row, a_scale, scaled):
    """``scaled = row * a_scale``, eight lanes at a time."""
    k = row.shape[0]
    k8 = k - k % LANES
    for q in range(0, k8, LANES):
        store_f32x8(scaled, q, mul_f32x8(load_f32x8(row, q), load_f32x8(a_scale, q)))
    for q in range(k8, k):
        scaled[q] = row[q] * a_scale[q]


@njit(inline="always")
def _top_x8(row):
    """``_top`` of a float32 row, eight lanes at a time (the scalar loop ran four lanes, latency-bound)."""
    k = row.shape[0]
    k8 = k - k % LANES
    acc = zero_i32x8()
    for q in range(0, k8, LANES):
        acc = abs_top_u32x8(acc, load_f32x8(row, q))
    top = hmax_u32x8(acc)
    tail = _top(row[k8:].view(np.uint32))
    return tail if tail > top else top


def _quantize(x, a_scale, has_scale, step, floor, lo, hi, shift, kp, a8, asum, steps, signs, block):
    """`broadcast._quantize` with per-row steps: `v = x[i, q] (* a_scale[q])` (first rotated,
    `hadamard.rotate_row(x[i], signs, block)`, when `block` > 0), row i's step
    `steps[i] = step * max(max_q |v|, floor)`, `a8[i, q] = rint(clip(v / steps[i], lo, hi)) - shift`
    (pad columns 0), `asum[i]` the row's code sum; True if any NaN or an infinite step was seen. Eight lanes at a time
    (`simd_f32`): LLVM vectorised the scalar loops four wide, 19 us for 64 x 384 (6 with these)."""
    m, k = x.shape
    k8 = k - k % LANES
    flo = np.float32(lo)
    fhi = np.float32(hi)
    sh = np.int32(shift)
    vlo = splat_f32x8(flo)
    vhi = splat_f32x8(fhi)
    qblocks = (m + QROWS - 1) // QROWS
    nan = np.zeros(qblocks, dtype=np.bool_)
    for t in prange(qblocks):
        seen = False
        scaled = np.empty(k, dtype=np.float32)
        rotated = np.empty(k if block > 0 else 0, dtype=np.float32)
        top = np.empty(1, dtype=np.uint32)
        for i in range(t * QROWS, min(m, t * QROWS + QROWS)):
            row = x[i]
            if block > 0:
                rotate_row(row, signs, block, rotated)
                row = rotated
            if has_scale:
                _scale_into(row, a_scale, scaled)
                row = scaled
            top[0] = _top_x8(row)
            s = step * max(top.view(np.float32)[0], floor)
            steps[i] = s
            seen |= s == np.inf  # a finite row whose step overflows: its codes would all be 0, its outputs NaN
            base = i * kp
            vs = splat_f32x8(s)
            nans = zero_i32x8()
            sums = zero_i32x8()
            for q in range(0, k8, LANES):
                v = div_f32x8(load_f32x8(row, q), vs)
                nans = nan_mask_f32x8(nans, v)
                codes = codes_f32x8(v, vlo, vhi, sh)
                store_i8x8(a8, base + q, codes)
                sums = add_i32x8(sums, codes)
            seen |= any_i32x8(nans)
            total = np.int32(hsum_i32x8(sums))
            for q in range(k8, k):
                v = row[np.uintp(q)] / s
                seen |= v != v
                code = np.int32(np.rint(min(max(v, flo), fhi))) - sh
                a8[np.uintp(base + q)] = code
                total += code
            for q in range(k, kp):
                a8[np.uintp(base + q)] = 0
            asum[i] = total
        nan[t] = seen
    return nan.any()


@functools.cache
def quantize_pass(parallel: bool):
    """`_quantize` compiled with (`parallel`) or without `prange` threads, one cache entry each."""
    variant = "parallel" if parallel else "serial"
    fn = njit(parallel=parallel, cache=True)(simd.cache_variant(_quantize, variant))
    return simd.pin_uuid(fn, f"row_steps.quantize.{variant}")
