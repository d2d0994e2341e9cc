"""Integer reference: plain NumPy int64 on unpacked codes. It defines correctness.

No packing, no offsets, no SIMD: the kernels must match these results bit for bit.
"""

from __future__ import annotations

import numpy as np


def gemm(a_codes: np.ndarray, w_codes: np.ndarray) -> np.ndarray:
    """``a (M, K) @ w (N, K).T`` in int64."""
    return a_codes.astype(np.int64) @ w_codes.astype(np.int64).T


def conv2d(
    a_codes: np.ndarray,
    w_codes: np.ndarray,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """Direct int64 convolution (cross-correlation, as torch) with zero padding.

    ``a_codes`` is (B, C_in, H, W), ``w_codes`` is (C_out, C_in/groups, kh, kw); returns
    (B, C_out, Ho, Wo).
    """
    b, c_in, h, w = a_codes.shape
    c_out, cg, kh, kw = w_codes.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    x = np.zeros((b, c_in, h + 2 * ph, w + 2 * pw), dtype=np.int64)
    x[:, :, ph : ph + h, pw : pw + w] = a_codes
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = c_out // groups
    wt = w_codes.astype(np.int64)
    out = np.zeros((b, c_out, ho, wo), dtype=np.int64)
    for g in range(groups):
        xg = x[:, g * cg : (g + 1) * cg]
        wg = wt[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("bchw,oc->bohw", patch, wg[:, :, i, j])
    return out
