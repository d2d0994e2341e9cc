from __future__ import annotations

import numpy as np
import pytest
import torch

from bitmix.kernels import reference


def test_gemm_is_int64_matmul() -> None:
    a = np.array([[127, -128]], dtype=np.int8)
    w = np.array([[127, 127], [-128, -128]], dtype=np.int8)
    out = reference.gemm(a, w)
    assert out.dtype == np.int64 and out.tolist() == [[-127, 128]]


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [
        ((1, 1), (0, 0), (1, 1), 1),
        ((2, 1), (1, 2), (1, 2), 2),
        ((1, 1), (1, 1), (1, 1), 4),
        ((3, 2), (2, 0), (2, 1), 1),
    ],
)
def test_conv_matches_torch(stride, padding, dilation, groups) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (2, 4, 9, 8))
    w = rng.integers(-8, 8, (8, 4 // groups, 3, 2))
    want = torch.nn.functional.conv2d(
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(w, dtype=torch.float64),
        None,
        stride,
        padding,
        dilation,
        groups,
    )
    assert np.array_equal(reference.conv2d(a, w, stride, padding, dilation, groups), want.numpy().astype(np.int64))
