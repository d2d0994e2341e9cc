"""A conv's input already quantized into its implicit GEMM's padded code buffer (issue 15).

In a lowered conv net a depthwise conv followed by a one-group conv (MobileNet's depthwise ->
1x1 projection) passes int8 codes instead of floats: the depthwise epilogue quantizes its float
results with the next conv's step straight into that conv's zero-padded NHWC buffer
(``conv_nhwc.depthwise_to_codes``), so the next conv skips its float -> code pass and its input
is a quarter of the bytes. Plain NumPy, so the compiler can recognise one without loading Numba.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class PaddedCodes:
    """``a8`` ``(B, Hp, Wp, c4)`` int8 shifted codes with per-pixel sums ``psum`` (``conv_nhwc._pad_codes``'
    layout) standing for a float input of NCHW ``shape``, quantized for the conv ``owner`` alone."""

    a8: np.ndarray
    psum: np.ndarray
    shape: tuple[int, int, int, int]
    owner: object
