"""A transposed conv equals its equivalent conv2d + pixel shuffle + crop (`bitmix.compiler.transposed`)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import bitmix
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
    x2 = torch.randn(1, 6, n + 3, n + 1, generator=gen, dtype=torch.float64)  # another size, the same graph
    out2 = shuffle_and_crop(F.conv2d(x2, weight, equivalent_bias(b, g), 1, g.pad, 1, groups), *shuffle_args(g))
    assert torch.allclose(out2, F.conv_transpose2d(x2, w, b, stride, p, o, groups), rtol=0, atol=1e-10)


def test_a_compiled_transposed_conv_serves_every_input_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)).eval()
    dims = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)
    cm = bitmix.compile(model, (torch.randn(2, 3, 8, 8),), "int8-npu", data=torch.randn(8, 3, 8, 8),
                        options=bitmix.CompileOptions(frontier_points=0, dynamic_shapes=dims))
    for shape in ((1, 3, 8, 8), (1, 3, 12, 10), (3, 3, 16, 5)):
        x = torch.randn(shape)
        with torch.no_grad():
            out, ref = cm(x), model(x)
            assert out.shape == ref.shape and torch.equal(out, cm.fake_quant(x))
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
