"""The online input rotation's block Walsh-Hadamard transform as one Numba pass (issue 12's rotation).

`bitmix.compiler.hadamard` writes the transform as torch butterflies: one `stack` per stage, 7-9
stages per call, 250 us for a 64 x 384 input and 1.06 ms for 64 x 1536 on one torch thread (AMD
EPYC, 2026-12-04). This pass computes the same float32 operations in the same order (`x * s`, then
for h = 1, 2, 4, ... the pairs (j, j + h) of each 2h-group become (a + b, a - b)), so its bits equal
the torch version's. With blocks of at least 8 it runs on eight-lane vectors (`simd_f32`): the
stages h = 1, 2, 4 inside each vector's registers, the later ones as vector butterflies between
loads and stores (LLVM's own vectoriser left them scalar), two stages per pass over the row (the sign
flip's pass also does stages 8 and 16): 64 x 384 in 11 us, 64 x 1536 in 39-49 (14 and 57-73 one stage a
pass; 53 and 282-496 scalar; AMD EPYC, 2026-12-06). One thread: a parallel launch over rows was no
faster at MiniLM's shapes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from bitmix.kernels.simd_f32 import add_f32x8, hadamard_f32x8, load_f32x8, mul_f32x8, store_f32x8, sub_f32x8

LANES = 8


@njit(inline="always")
def _scalar_row(src, signs, block, row):
    """Blocks narrower than a vector (K with fewer than three factors of two)."""
    k = row.shape[0]
    for c in range(k):
        row[c] = src[c] * signs[c]
    h = 1
    while h < block:
        for i in range(0, k, 2 * h):
            for j in range(i, i + h):
                a = row[j]
                b = row[j + h]
                row[j] = a + b
                row[j + h] = a - b
        h *= 2


@njit(inline="always")
def _store_quad(row, j, h, x0, x1, x2, x3):
    """Stages ``h`` and ``2h`` on the vectors at ``j``, ``j + h``, ``j + 2h``, ``j + 3h`` (``j`` in the first
    quarter of a ``4h`` group): the scalar butterflies' additions and subtractions, two stages per pass over
    the row."""
    y0 = add_f32x8(x0, x1)
    y1 = sub_f32x8(x0, x1)
    y2 = add_f32x8(x2, x3)
    y3 = sub_f32x8(x2, x3)
    store_f32x8(row, j, add_f32x8(y0, y2))
    store_f32x8(row, j + h, add_f32x8(y1, y3))
    store_f32x8(row, j + 2 * h, sub_f32x8(y0, y2))
    store_f32x8(row, j + 3 * h, sub_f32x8(y1, y3))


@njit(inline="always")
def _vector_row(src, signs, block, row):
    k = row.shape[0]
    h = LANES
    if block >= 4 * LANES:  # the sign flip, the in-register stages and stages 8 and 16 in one pass
        for c in range(0, k, 4 * LANES):
            _store_quad(row, c, LANES,
                        hadamard_f32x8(mul_f32x8(load_f32x8(src, c), load_f32x8(signs, c))),
                        hadamard_f32x8(mul_f32x8(load_f32x8(src, c + LANES), load_f32x8(signs, c + LANES))),
                        hadamard_f32x8(mul_f32x8(load_f32x8(src, c + 2 * LANES), load_f32x8(signs, c + 2 * LANES))),
                        hadamard_f32x8(mul_f32x8(load_f32x8(src, c + 3 * LANES), load_f32x8(signs, c + 3 * LANES))))
        h = 4 * LANES
    else:
        for c in range(0, k, LANES):
            store_f32x8(row, c, hadamard_f32x8(mul_f32x8(load_f32x8(src, c), load_f32x8(signs, c))))
    while 4 * h <= block:
        for i in range(0, k, 4 * h):
            for j in range(i, i + h, LANES):
                _store_quad(row, j, h, load_f32x8(row, j), load_f32x8(row, j + h), load_f32x8(row, j + 2 * h),
                            load_f32x8(row, j + 3 * h))
        h *= 4
    if h < block:
        for i in range(0, k, 2 * h):
            for j in range(i, i + h, LANES):
                a = load_f32x8(row, j)
                b = load_f32x8(row, j + h)
                store_f32x8(row, j, add_f32x8(a, b))
                store_f32x8(row, j + h, sub_f32x8(a, b))


@njit(inline="always")
def rotate_row(src, signs, block, row):
    """``row = hadamard(src * signs, block)`` for one contiguous row (also the fused linears' quantize pass)."""
    if block >= LANES:
        _vector_row(src, signs, block, row)
    else:
        _scalar_row(src, signs, block, row)


@njit(cache=True)
def _rotate(x, signs, block, out):
    for r in range(x.shape[0]):
        rotate_row(x[r], signs, block, out[r])


def rotate_rows(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """`hadamard(x * signs, block)` over the last axis of float32 `x` (a new array)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    _rotate(flat, np.ascontiguousarray(signs, dtype=np.float32), block, out)
    return out.reshape(x.shape)
