"""Attention's activation x activation products (Q K^T, P V) as one Numba call: both operands' codes,
their exact product and its scaling.

The lowered form ran five passes with torch and Python between them (a contiguous copy of each
operand, one code pass each, torch's batched matmul on the float codes, then the scale product):
MiniLM's 12-head 64 x 64 x 32 products took 127-142 us a call alone and ~190 us in the model, 12 calls
per forward (AMD EPYC, 2026-12-04). Here each of ``b``'s (K, N) matrices gets its column steps and
codes in one pass, then each 4-row block of ``a`` its steps and codes and its output rows, the product
on 8-lane FMA register blocks; operands are read through their strides (the heads' views need no copy,
and K^T, a transposed view, is read along its contiguous rows). MiniLM: 10.79 -> 10.16 ms a forward.
Rows with unit stride are copied eight lanes at a time, and no scratch is allocated inside the parallel
loops (2026-12-05, Sapphire Rapids, same process A/B: 12-head QK^T 151 -> 104 us, PV 130 -> 85 us;
MiniLM all-4-bit 8.86 -> 8.40 ms a forward).
The row maxima and code passes run eight lanes at a time (``simd_f32``; LLVM left them scalar or four-wide):
12-head QK^T ~126 -> ~108 us, PV ~111 -> ~98 us (AMD EPYC, one thread, 2026-12-06).

Same float32 operations as the passes it replaces, so the same bits: steps ``step * max(max|x|,
floor)`` along the contraction axis (per-row mode) or ``step`` (per-tensor), codes
``rint(clip(x / step, lo, hi))``, and ``acc * (a_step * b_step)``. The product of float32 codes is
accumulated in float32, exact while ``K * max|a code| * max|b code| <= 2^24`` (the caller checks;
below it every partial sum is an integer float32 represents), so its order does not matter.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bitmix.kernels import threads
from bitmix.kernels.row_steps import _top_x8
from bitmix.kernels.scratch import aligned_empty
from bitmix.kernels.simd import zero_i32x8
from bitmix.kernels.simd_f32 import (
    any_i32x8,
    div_f32x8,
    fma_f32x8,
    load_f32x8,
    mul_f32x8,
    nan_mask_f32x8,
    rint_clip_f32x8,
    splat_f32x8,
    store_f32x8,
)

threads.configure_threading()  # before this module's parallel loops first run
LANES = 8
ROWS, COLS = 4, 16  # a register block: 4 rows of ``a`` x 16 columns of ``b`` (8 accumulator vectors)
GROUP = 4  # register blocks (16 rows of ``a``) per parallel task


@njit(inline="always")
def _step(x, per_row, step, floor, top):
    """``step * max(max|x|, floor)`` over contiguous 1-D ``x`` in per-row mode, else ``step``; ``top`` is a
    1-element uint32 scratch array. The max runs on the float bits eight lanes at a time
    (``row_steps._top_x8``: a float max reduction stays scalar, one compare-and-select latency per
    element); a NaN wins it, which the codes then report."""
    if not per_row:
        return step
    top[0] = _top_x8(x)
    return step * max(top.view(np.float32)[0], floor)


@njit(inline="always")
def _codes(x, steps, lo, hi, codes):
    """``codes[c] = rint(clip(x[c] / steps[c], lo, hi))``; True if one is NaN. Eight lanes at a time, then the
    tail; unsigned indices there: Numba's wraparound check on signed ones keeps loops scalar."""
    n = x.shape[0]
    n8 = n - n % LANES
    vlo = splat_f32x8(lo)
    vhi = splat_f32x8(hi)
    nans = zero_i32x8()
    for c in range(0, n8, LANES):
        v = div_f32x8(load_f32x8(x, c), load_f32x8(steps, c))
        nans = nan_mask_f32x8(nans, v)
        store_f32x8(codes, c, rint_clip_f32x8(v, vlo, vhi))
    seen = any_i32x8(nans)
    for c in range(n8, n):
        v = x[np.uintp(c)] / steps[np.uintp(c)]
        seen |= v != v
        codes[np.uintp(c)] = np.rint(min(max(v, lo), hi))
    return seen


@njit(inline="always")
def _row_codes(x, step, lo, hi, codes):
    """``_codes`` at one step for the whole row."""
    n = x.shape[0]
    n8 = n - n % LANES
    vs = splat_f32x8(step)
    vlo = splat_f32x8(lo)
    vhi = splat_f32x8(hi)
    nans = zero_i32x8()
    for c in range(0, n8, LANES):
        v = div_f32x8(load_f32x8(x, c), vs)
        nans = nan_mask_f32x8(nans, v)
        store_f32x8(codes, c, rint_clip_f32x8(v, vlo, vhi))
    seen = any_i32x8(nans)
    for c in range(n8, n):
        v = x[np.uintp(c)] / step
        seen |= v != v
        codes[np.uintp(c)] = np.rint(min(max(v, lo), hi))
    return seen


@njit(inline="always")
def _store(dst, c0, n, acc0, acc1, step, col_steps, tmp):
    """Columns ``c0 .. c0 + 15`` (those below ``n``) of one output row: ``acc * (step * col_steps)``."""
    s = splat_f32x8(step)
    v0 = mul_f32x8(acc0, mul_f32x8(s, load_f32x8(col_steps, c0)))
    v1 = mul_f32x8(acc1, mul_f32x8(s, load_f32x8(col_steps, c0 + LANES)))
    if c0 + COLS <= n:
        store_f32x8(dst, c0, v0)
        store_f32x8(dst, c0 + LANES, v1)
        return
    store_f32x8(tmp, 0, v0)
    store_f32x8(tmp, LANES, v1)
    for c in range(c0, n):
        dst[c] = tmp[c - c0]


@njit(inline="always")
def _copy(src, dst):
    """``dst[:] = src`` for a row read through arbitrary strides: the passes after it run on a contiguous
    row (Numba cannot vectorise loads through a stride it only knows at run time). A row with unit stride
    (attention's heads are views whose rows are contiguous) is copied eight lanes at a time: element by
    element the two copies took a third of MiniLM's 12-head 64 x 64 x 32 product."""
    n = src.shape[0]
    c = 0
    if src.strides[0] == 4:
        while c + LANES <= n:
            store_f32x8(dst, c, load_f32x8(src, c))
            c += LANES
    for j in range(c, n):
        dst[np.uintp(j)] = src[j]


@njit(inline="always")
def _b_codes(b, i, by_columns, per_row, b_step, floor, lo, hi, n_pad, codes, steps, line, col_codes, top):
    """Matrix ``i`` of ``b``: its column steps and codes (row kk at ``kk * n_pad``, zero padded) into
    ``codes``/``steps``; True if a code is NaN."""
    seen = False
    if by_columns:  # each column's codes along its contiguous row, then transposed into place
        n, k = b.shape[1], b.shape[2]
        col = line[:k]
        for c in range(n):
            _copy(b[i, c], col)
            steps[c] = _step(col, per_row, b_step, floor, top)
            seen |= _row_codes(col, steps[c], lo, hi, col_codes[c])
        for kk in range(k):
            for c in range(n):
                codes[kk * n_pad + c] = col_codes[c, kk]
        return seen
    k, n = b.shape[1], b.shape[2]
    row = line[:n]
    if per_row:
        for r in range(k):
            _copy(b[i, r], row)
            for c in range(n):
                v = abs(row[np.uintp(c)])
                steps[np.uintp(c)] = v if v > steps[np.uintp(c)] else steps[np.uintp(c)]
        for c in range(n):
            steps[np.uintp(c)] = b_step * max(steps[np.uintp(c)], floor)
    else:
        steps[:n] = b_step
    for r in range(k):
        _copy(b[i, r], row)
        seen |= _codes(row, steps, lo, hi, codes[r * n_pad:r * n_pad + n])
    return seen


@njit(inline="always")
def _a_blocks(a, i, first, last, per_row, a_step, floor, lo, hi, bi, col_steps, n, n_pad, codes, steps, row, top,
              tmp, out):
    """Output rows of 4-row blocks ``first .. last - 1`` of matrix ``i``: each block's codes of ``a``, then
    its product with ``b``'s codes ``bi`` (column steps ``col_steps``); True if a code is NaN."""
    m = a.shape[1]
    seen = False
    for blk in range(first, last):
        r0 = blk * ROWS
        for j in range(ROWS):  # rows past the end repeat the last one; their results are not stored
            _copy(a[i, min(r0 + j, m - 1)], row)
            steps[j] = _step(row, per_row, a_step, floor, top)
            seen |= _row_codes(row, steps[j], lo, hi, codes[j])
        for c0 in range(0, n_pad, COLS):
            acc00 = acc01 = acc10 = acc11 = acc20 = acc21 = acc30 = acc31 = splat_f32x8(np.float32(0.0))
            for kk in range(a.shape[2]):
                at = kk * n_pad + c0
                b0 = load_f32x8(bi, at)
                b1 = load_f32x8(bi, at + LANES)
                q = splat_f32x8(codes[0, kk])
                acc00 = fma_f32x8(q, b0, acc00)
                acc01 = fma_f32x8(q, b1, acc01)
                q = splat_f32x8(codes[1, kk])
                acc10 = fma_f32x8(q, b0, acc10)
                acc11 = fma_f32x8(q, b1, acc11)
                q = splat_f32x8(codes[2, kk])
                acc20 = fma_f32x8(q, b0, acc20)
                acc21 = fma_f32x8(q, b1, acc21)
                q = splat_f32x8(codes[3, kk])
                acc30 = fma_f32x8(q, b0, acc30)
                acc31 = fma_f32x8(q, b1, acc31)
            _store(out[i, r0], c0, n, acc00, acc01, steps[0], col_steps, tmp)
            if r0 + 1 < m:
                _store(out[i, r0 + 1], c0, n, acc10, acc11, steps[1], col_steps, tmp)
            if r0 + 2 < m:
                _store(out[i, r0 + 2], c0, n, acc20, acc21, steps[2], col_steps, tmp)
            if r0 + 3 < m:
                _store(out[i, r0 + 3], c0, n, acc30, acc31, steps[3], col_steps, tmp)
    return seen


@njit(inline="always")
def _fill_zero(x):
    """``x[:] = 0`` as a plain loop: in a ``parallel=True`` function ``np.zeros`` is a parallel loop of its own."""
    for i in range(x.shape[0]):
        x[i] = 0


@njit(inline="always")
def _any(flags):
    """``flags.any()`` as a plain loop (a reduction would be another parallel launch)."""
    seen = False
    for i in range(flags.shape[0]):
        seen |= flags[i]
    return seen


@njit(parallel=True, cache=True)
def _code_matmul(a, b, by_columns, a_step, b_step, floor, per_row, a_lo, a_hi, b_lo, b_hi, threads, out):
    """``out[i] = (codes(a[i]) @ codes(b[i])) * (a_steps x b_steps)`` for (B, M, K) ``a`` and (B, K, N) ``b``,
    or ``b`` given as its (B, N, K) transpose when ``by_columns`` (then each column is a contiguous row);
    True if a NaN was seen (an operand's NaN, or Inf in per-row mode, makes a code NaN).

    With at least two matrices per ``threads`` (Numba's thread count), one parallel loop over matrices does
    each one's ``b`` pass and then its rows; else a loop over matrices (``b``), then one over 16-row groups:
    one parallel launch fewer where there are enough matrices to share out."""
    nb, m, k = a.shape
    n = b.shape[1] if by_columns else b.shape[2]
    n_pad = (n + COLS - 1) // COLS * COLS
    blocks = (m + ROWS - 1) // ROWS
    groups = (blocks + GROUP - 1) // GROUP
    tasks = nb * groups
    # Scratch, allocated once per call rather than inside the parallel loops.
    b_codes = np.empty((nb, k * n_pad), dtype=np.float32)
    b_steps = np.empty((nb, n_pad), dtype=np.float32)
    _fill_zero(b_codes.reshape(-1))
    _fill_zero(b_steps.reshape(-1))
    b_line = np.empty((nb, max(k, n)), dtype=np.float32)  # one copied row (or column) of b[i]
    col_codes = np.empty((nb, n if by_columns else 0, k), dtype=np.float32)
    a_codes = np.empty((tasks, ROWS, k), dtype=np.float32)
    a_steps = np.empty((tasks, ROWS), dtype=np.float32)
    a_line = np.empty((tasks, k), dtype=np.float32)
    tops = np.empty((nb + tasks, 1), dtype=np.uint32)
    tails = np.empty((tasks, COLS), dtype=np.float32)
    nan = np.empty(tasks + nb, dtype=np.bool_)  # every entry is written below
    lo_a, hi_a, lo_b, hi_b = np.float32(a_lo), np.float32(a_hi), np.float32(b_lo), np.float32(b_hi)
    if nb >= 2 * threads:
        for i in prange(nb):
            seen = _b_codes(b, i, by_columns, per_row, b_step, floor, lo_b, hi_b, n_pad, b_codes[i], b_steps[i],
                            b_line[i], col_codes[i], tops[i])
            seen |= _a_blocks(a, i, 0, blocks, per_row, a_step, floor, lo_a, hi_a, b_codes[i], b_steps[i], n, n_pad,
                              a_codes[i], a_steps[i], a_line[i], tops[nb + i], tails[i], out)
            nan[i] = seen
        return _any(nan[:nb])
    for i in prange(nb):
        nan[tasks + i] = _b_codes(b, i, by_columns, per_row, b_step, floor, lo_b, hi_b, n_pad, b_codes[i],
                                  b_steps[i], b_line[i], col_codes[i], tops[i])
    for t in prange(tasks):
        i = t // groups
        g = t - i * groups
        nan[t] = _a_blocks(a, i, g * GROUP, min(blocks, g * GROUP + GROUP), per_row, a_step, floor, lo_a, hi_a,
                           b_codes[i], b_steps[i], n, n_pad, a_codes[t], a_steps[t], a_line[t], tops[nb + t], tails[t],
                           out)
    return _any(nan)


def code_matmul(a: np.ndarray, b: np.ndarray, a_step: float, b_step: float, floor: float | None,
                a_range: tuple[int, int], b_range: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The scaled code product of float32 ``a`` (..., M, K) and ``b`` (..., K, N) (batch dims broadcast):
    per-row steps of ``a`` and per-column steps of ``b`` from their maxima when ``floor`` is given, else the
    two steps; codes in ``a_range`` / ``b_range`` (lo, hi). Returns (float32 (..., M, N), NaN seen)."""
    batch = a.shape[:-2]
    if b.shape[:-2] != batch:  # np.broadcast_shapes costs ~2 us a call
        batch = np.broadcast_shapes(batch, b.shape[:-2])
    m, k = a.shape[-2:]
    n = b.shape[-1]
    nb = math.prod(batch)
    a3 = _batched(a, batch).reshape(nb, m, k)
    b3 = _batched(b, batch).reshape(nb, k, n)
    by_columns = b3.strides[1] == b3.itemsize != b3.strides[2]  # a transposed view: its columns are rows
    if by_columns:
        b3 = b3.transpose(0, 2, 1)
    out = aligned_empty((nb, m, n), np.float32)
    per_row = floor is not None
    nan = _code_matmul(_one_signature(a3), _one_signature(b3), by_columns, np.float32(a_step), np.float32(b_step),
                       np.float32(floor if per_row else 0.0), per_row, *a_range, *b_range, threads.thread_count(), out)
    return out.reshape(*batch, m, n), bool(nan)


def _batched(x: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """``x`` broadcast over ``batch`` as a view that stays writable (``np.broadcast_to``'s is read-only: another
    Numba signature); the kernel never writes its operands."""
    if x.shape[:-2] == batch:
        return x
    shape = (*batch, *x.shape[-2:])
    return np.lib.stride_tricks.as_strided(x, shape, np.broadcast_to(x, shape).strides)


def _one_signature(x: np.ndarray) -> np.ndarray:
    """``x`` as a writable C-contiguous or strided ('A') array, the two layouts ``warmup`` compiles: Numba types a
    column-major ('F': a transposed matrix, one per batch) or read-only array as a signature of its own, and each
    new signature of ``_code_matmul`` is a cold compile of ~40 s in the first call that meets it."""
    if x.flags.writeable and (x.flags.c_contiguous or not x.flags.f_contiguous):
        return x
    return np.array(x, order="C")
