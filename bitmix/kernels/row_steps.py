"""Per-row activation steps (`bitmix.ir.row_steps`) around a lowered linear, as two Numba passes.

The torch form (`row_max`, the step product, a division, then `out * step + bias`) is five small ops
and allocations per call, ~35 us per MiniLM linear (64 x 384 in, 64 x 1536 out; AMD EPYC, 2026-12-04).
These loops compute the same float32 operations in the same order (max of |x| over the row, floored at
`floor`; `step * max`; `x / row_step`; then `out * row_step + bias`), so their bits equal the torch form's.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _row_steps(x, step, floor, steps):
    """`step * max(max_c |x[r, c]|, floor)` per row. The max runs on the float32 bit patterns with the sign
    cleared: for non-negative IEEE floats the unsigned order is the float order, and a NaN (above +inf
    there) wins as it does in torch's amax; an integer max vectorises where a float one with NaN
    semantics does not (64 x 1536: 8 us vs 55 us)."""
    m, k = x.shape
    bits = x.view(np.uint32)
    tops = np.empty(m, np.uint32)
    for r in range(m):
        row = bits[r]
        top = np.uint32(0)
        for c in range(k):
            v = row[c] & np.uint32(0x7FFFFFFF)
            top = v if v > top else top
        tops[r] = top
    magnitudes = tops.view(np.float32)
    for r in range(m):
        steps[r] = step * max(magnitudes[r], floor)


@njit(cache=True)
def _divide_rows(x, step, floor, out, steps):
    _row_steps(x, step, floor, steps)
    m, k = x.shape
    for r in range(m):
        s = steps[r]
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
