"""The online input rotation's block Walsh-Hadamard transform as one Numba pass (issue 12's rotation).

`bitmix.compiler.hadamard` writes the transform as torch butterflies: one `stack` per stage, 7-9
stages per call, 250 us for a 64 x 384 input and 1.06 ms for 64 x 1536 on one torch thread (AMD
EPYC, 2026-12-04): the compiled all-4-bit MiniLM took 38 ms a forward (10.6 ms before the rotation).
This loop (50 us and 290 us for the same shapes) computes the same float32 operations in the same
order (`x * s`, then for h = 1, 2, 4, ... the pairs (j, j + h) of each 2h-group become (a + b,
a - b)), so its bits equal the torch version's. One thread: a parallel launch over rows was no
faster at MiniLM's shapes (64 x 1536: 281 vs 294 us; 300 x 1536: 2154 vs 1567 us). The h >= 16
stages do not vectorise (their loads and stores may alias as far as LLVM knows); a transposed,
row-vectorised layout is the next step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

CHUNK = 16  # the first log2(CHUNK) stages run chunk by chunk, where LLVM unrolls them into registers


@njit(inline="always")
def _butterfly(row, j, h):
    a = row[j]
    b = row[j + h]
    row[j] = a + b
    row[j + h] = a - b


@njit(inline="always")
def _stages(row, k, h, block):
    """The stages h, 2h, ... < block over the whole row."""
    while h < block:
        for i in range(0, k, 2 * h):
            for j in range(i, i + h):
                _butterfly(row, j, h)
        h *= 2


@njit(cache=True)
def _rotate(x, signs, block, out):
    m, k = x.shape
    first = min(block, CHUNK)
    for r in range(m):
        row = out[r]
        src = x[r]
        for c in range(k):
            row[c] = src[c] * signs[c]
        if first == CHUNK:  # stages h = 1, 2, 4, 8 inside each 16-chunk: constant trip counts
            for g in range(0, k, CHUNK):
                for stage in range(4):
                    h = 1 << stage
                    for i in range(g, g + CHUNK, 2 * h):
                        for j in range(i, i + h):
                            _butterfly(row, j, h)
        else:
            _stages(row, k, 1, first)
        _stages(row, k, first, block)


def rotate_rows(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """`hadamard(x * signs, block)` over the last axis of float32 `x` (a new array)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    _rotate(flat, np.ascontiguousarray(signs, dtype=np.float32), block, out)
    return out.reshape(x.shape)
