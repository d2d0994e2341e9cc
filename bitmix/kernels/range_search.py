"""Squared quantization error of many candidate steps in one pass over the values.

Range setting (``compiler/ranges.py``) scores ~21 candidate steps per weight row and per
activation tensor. In torch each candidate is seven memory passes (divide, clamp, round,
multiply, subtract, square, sum); MiniLM's compile spent 101 of its 151 s there (cProfile,
2026-12-02, `torch.compile(backend="bitmix")`, at load ~6; quiet, that compile takes ~10 s).
Here each value is read once per candidate from cache and the error accumulates in float64 in registers.

The quantizer is the deployed one, ``rint(clip(v / s, -q_n, q_p)) * s`` (round half to even);
the sum is reassociated (SIMD), so errors may differ from torch's in the last bits — this is
a search objective, never a bit-exactness contract.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.kernels import threads

threads.configure_threading()  # before this module's parallel loop first runs


@njit(parallel=True, cache=True, fastmath={"reassoc", "nsz"})
def _errors(v: np.ndarray, steps: np.ndarray, q_n: float, q_p: float, out: np.ndarray) -> None:
    rows, k = v.shape
    candidates = steps.shape[1]
    for job in prange(rows * candidates):
        r, c = job // candidates, job % candidates
        s = steps[r, c]
        acc = 0.0
        for i in range(k):
            x = v[r, i]
            d = np.rint(min(max(x / s, -q_n), q_p)) * s - x
            acc += np.float64(d) * np.float64(d)
        out[r, c] = acc


def step_errors(v: np.ndarray, steps: np.ndarray, q_n: int, q_p: int) -> np.ndarray:
    """(rows, candidates) float64: Σ_i (Q_s(v[r, i]) − v[r, i])² for each candidate step s = steps[r, c].

    `v` (rows, K) and `steps` (rows, candidates) are float32; every step must be > 0."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    steps = np.ascontiguousarray(steps, dtype=np.float32)
    out = np.empty(steps.shape, dtype=np.float64)
    _errors(v, steps, np.float32(q_n), np.float32(q_p), out)
    return out
