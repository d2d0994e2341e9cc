"""Max-pooling of channels-last float32 activations, parallel over output rows (issue 15).

Between a ResNet's stem conv and its first block sits one ``max_pool2d``; with torch's ops on
one thread while the kernels run (``lower.torch_on_one_thread``), torch's channels-last max-pool
(which also computes the argmax indices) took 1.6 ms of a 16 ms resnet18 forward on a 2-vCPU
VNNI VM. This kernel computes the same maxima: taps visited in torch's order (rows, then
columns), a value replaces the running maximum when it is greater or NaN, as in ATen's
``max_pool2d`` kernel, so NaN propagates and the first of equal values (0.0 / -0.0) is kept.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.kernels.threads import configure_threading

configure_threading()  # before a parallel kernel compiles or loads


@njit(parallel=True, cache=True)
def _max_pool(x, kh, kw, sh, sw, ph, pw, dh, dw, out):
    nb, h, w, c = x.shape
    ho, wo = out.shape[1], out.shape[2]
    for t in prange(nb * ho):
        b = t // ho
        oh = t - b * ho
        for ow in range(wo):
            dst = out[b, oh, ow]
            for q in range(c):
                dst[q] = -np.inf
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    src = x[b, ih, iw]
                    for q in range(c):
                        v = src[q]
                        dst[q] = v if (v > dst[q] or v != v) else dst[q]


def max_pool2d_nhwc(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """``(B, Ho, Wo, C)`` maxima of C-contiguous float32 NHWC ``x`` (``out_hw`` = torch's output size)."""
    y = np.empty((x.shape[0], *out_hw, x.shape[3]), dtype=np.float32)
    _max_pool(x, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], y)
    return y
