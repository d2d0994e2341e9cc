"""A transposed conv equals its equivalent conv2d + pixel shuffle + crop (`bitmix.compiler.transposed`)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bitmix.compiler.transposed import equivalent_bias, equivalent_weight, geometry, shuffle_and_crop, shuffle_args


def _cases():
    for k, s, p, o, n in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (0, 1, 2), (0, 1, 2), (1, 4, 7)):
        if o < s and p < k and (n - 1) * s - 2 * p + k + o > 0:
            yield k, s, p, o, n, 3 if (k + s + n) % 3 == 0 else 1  # a third of the cases with 3 groups


@pytest.mark.parametrize(("k", "s", "p", "o", "n", "groups"), list(_cases()))
def test_equivalent_conv_is_the_transposed_conv(k, s, p, o, n, groups):
    gen = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    w = torch.randn(6, 5, k, k + 1, generator=gen, dtype=torch.float64)  # a non-square kernel too
    b = torch.randn(5 * groups, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 6, n, n + 2, generator=gen, dtype=torch.float64)
    stride = (s, max(1, s - 1))  # and unequal strides
    o = (o, min(o, stride[1] - 1))
    ref = F.conv_transpose2d(x, w, b, stride, p, o, groups)
    g = geometry((n, n + 2), (k, k + 1), stride, (p, p), o, groups)
    weight = equivalent_weight(w, g)
    assert weight.shape == (5 * groups * stride[0] * stride[1], 6 // groups, *g.taps)
    out = shuffle_and_crop(F.conv2d(x, weight, equivalent_bias(b, g), 1, g.pad, 1, groups), *shuffle_args(g))
    assert out.shape == ref.shape and g.out == tuple(ref.shape[2:])
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)
