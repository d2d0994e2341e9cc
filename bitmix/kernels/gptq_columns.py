"""GPTQ's column loop inside one lazy-batch block (``compiler/gptq.py``'s ``compensate``) as one Numba pass.

In torch the loop is a few small ops per column, each a parallel region of torch's OpenMP pool: about
five barriers per column, 20,000 for a 4000-column pass. Once, beside another agent's compiles (load ~3
on the 2 vCPUs), a 2000 x 1500 pass took 25.4 s that way and 0.73 s with the loop on one thread; that
stall did not reproduce beside one or two busy loops, a spinning torch process or a concurrent bitmix
compile (0.36-0.69 s either way), and quiet, one thread is 30 % slower than two (4000 x 3000: 1.5 vs
1.1 s). Here the output rows are split over threads once per block and each thread runs the block's
columns over its rows: one parallel region per 128 columns, as fast as the torch loop on two threads
when quiet (4000 x 3000: 1.09 s both; Sapphire Rapids, 2026-12-05).

Per element it is the same float arithmetic in the same order as the torch loop, so the results are
bit-identical: the column as float32, its dequantization ``rint(clip(col / s, -q_n, q_p)) * s`` in float32,
the error ``(col - dq) / u[i, i]`` in float64, then ``block[j] -= u[i, j] * err`` for the later columns
(a multiply and a subtract: Numba does not contract them into an FMA without fastmath).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.kernels import threads

threads.configure_threading()  # before this module's parallel loop first runs

ROWS = 256  # output rows per task: a block's 128 columns of them (256 KiB of float64) stay in L2


@njit(parallel=True, cache=True)
def _columns(block, u, steps, q_n, q_p, out, errors):
    groups, b, r = block.shape
    chunks = (r + ROWS - 1) // ROWS
    lo_f, hi_f = np.float32(-q_n), np.float32(q_p)
    for task in prange(groups * chunks):
        g = task // chunks
        first = (task - g * chunks) * ROWS
        last = min(r, first + ROWS)
        for i in range(b):
            d = u[g, i, i]
            for k in range(first, last):
                col = np.float32(block[g, i, k])
                out[g, i, k] = col
                s = steps[g, k]
                dq = np.float32(np.rint(min(max(col / s, lo_f), hi_f))) * s
                errors[g, i, k] = (np.float64(col) - np.float64(dq)) / d
            err = errors[g, i, first:last]
            for j in range(i + 1, b):
                uij = u[g, i, j]
                row = block[g, j, first:last]
                for k in range(last - first):  # from 0 over slices: no negative-index wraparound, so it vectorizes
                    row[k] -= uij * err[k]


def block_columns(block: np.ndarray, u: np.ndarray, steps: np.ndarray, q_n: int, q_p: int, out: np.ndarray,
                  errors: np.ndarray) -> None:
    """Quantize the block's columns in order with GPTQ's updates, in place: ``block`` (G, b, R) float64 (the
    columns as they are compensated), ``u`` (G, b, b) float64 (the block's inverse-Hessian factor),
    ``steps`` (G, R) float32; writes ``out`` (G, b, R) float32 (each column as it was rounded) and
    ``errors`` (G, b, R) float64 (each column's scaled error, for the update of the later blocks)."""
    _columns(block, u, steps, np.float32(q_n), np.float32(q_p), out, errors)
