"""Exact int32 batched matmul of two activation-code tensors (attention's Q K^T and P V).

Both operands change every call, so packing one of them the way weights are packed costs
more than it saves (MiniLM: 144 pack + GEMV/GEMM calls per forward, one per head). This is
a direct loop on the codes instead: parallel over (batch, row), vectorised over N, int32
accumulators, exact while ``K * 255 * 255 < 2^31`` (``limits.MAX_BMM_K``); any signedness, since
nothing is packed.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels import threads
from bitmix.kernels.limits import MAX_BMM_K

threads.configure_threading()  # before this module's parallel loop first runs


@njit(parallel=True, cache=True)
def _bmm(a, b, out):
    nb, m, k = a.shape
    n = b.shape[2]
    for t in prange(nb * m):
        i = t // m
        r = t - i * m
        acc = out[i, r]
        acc[:] = 0
        for kk in range(k):
            av = np.int32(a[i, r, kk])
            if av != 0:
                row = b[i, kk]
                for j in range(n):
                    acc[j] += av * np.int32(row[j])


def _codes(x: object, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iu" or x.ndim != 3:
        raise BitmixError(f"{name}: expected a 3-D integer numpy array (batch, rows, cols), got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if x.size and x.dtype.itemsize > 1 and (int(x.min()) < -255 or int(x.max()) > 255):
        raise BitmixError(f"{name}: codes must lie in [-255, 255] (at most 8 bits)")
    x = np.ascontiguousarray(x)
    return x if x.flags.writeable else x.copy()  # a read-only array is a Numba signature of its own (a cold compile)


def bmm(a_codes: np.ndarray, b_codes: np.ndarray) -> np.ndarray:
    """Exact int32 ``a_codes (B, M, K) @ b_codes (B, K, N)`` -> (B, M, N)."""
    a = _codes(a_codes, "a_codes")
    b = _codes(b_codes, "b_codes")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise BitmixError(f"a_codes {a.shape} and b_codes {b.shape}: need (B, M, K) and (B, K, N)")
    if a.shape[2] > MAX_BMM_K:
        raise BitmixError(f"a_codes: K={a.shape[2]} exceeds {MAX_BMM_K}, beyond which int32 sums could overflow")
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=np.int32)
    _bmm(a, b, out)
    return out
