"""``PreparedConv``: the checked-once call of a lowered conv gives ``qconv2d_nhwc``'s results and errors."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import pack_weights, qconv2d_nhwc
from bitmix.kernels.conv_prepared import PreparedConv


@pytest.mark.parametrize("groups", [1, 6, 2])  # implicit GEMM, depthwise, grouped (NCHW route, never cached)
def test_repeated_calls_match_qconv2d_nhwc(groups: int) -> None:
    rng = np.random.default_rng(groups)
    w = pack_weights(rng.integers(-8, 8, (6, 6 // groups * 9)).astype(np.int8), 4)
    scales = rng.uniform(0.01, 0.1, 6).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    args = (w, scales, 0.05, 8, False, bias, (3, 3), (2, 2), (1, 1), (1, 1), groups)
    conv = PreparedConv(*args)
    for shape in [(2, 7, 9, 6), (2, 7, 9, 6), (1, 5, 4, 6), (2, 7, 9, 6)]:  # seen shapes take the fast path
        x = rng.normal(0, 2, size=shape).astype(np.float32)
        np.testing.assert_array_equal(conv(x, True), qconv2d_nhwc(x, *args))
    x = rng.normal(0, 2, size=(2, 7, 9, 6)).astype(np.float32)
    x[1, 3, 3, 2] = np.nan
    with pytest.raises(BitmixError, match="NaN"):
        conv(x, True)
    with pytest.raises(BitmixError, match="float32"):
        conv(x.astype(np.float64), True)
