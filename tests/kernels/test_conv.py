"""conv2d (im2col + grouped GEMM) is bit-exact against the direct int64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitmix.errors import BitmixError
from bitmix.kernels import conv2d, pack_weights, reference

from .conftest import random_codes


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 4))
    og = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    if depthwise:
        cg, og = 1, draw(st.sampled_from([1, 2]))
        groups = draw(st.integers(1, 8))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    min_h = dilation[0] * (kh - 1) + 1 - 2 * padding[0]
    min_w = dilation[1] * (kw - 1) + 1 - 2 * padding[1]
    h = draw(st.integers(max(1, min_h), max(1, min_h) + 6))
    w = draw(st.integers(max(1, min_w), max(1, min_w) + 6))
    return dict(
        b=draw(st.integers(1, 2)),
        groups=groups,
        c_in=cg * groups,
        c_out=og * groups,
        ksize=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        hw=(h, w),
        a_bits=draw(st.sampled_from([8, 4, 2])),
        w_bits=draw(st.sampled_from([8, 4, 2])),
        a_signed=draw(st.booleans()),
        fill=draw(st.sampled_from(["random", "random", "min", "max"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _check(c: dict) -> None:
    rng = np.random.default_rng(c["seed"])
    kh, kw = c["ksize"]
    w = random_codes(rng, (c["c_out"], c["c_in"] // c["groups"], kh, kw), c["w_bits"]).astype(np.int8)
    a = random_codes(rng, (c["b"], c["c_in"], *c["hw"]), c["a_bits"], c["a_signed"], c["fill"])
    packed = pack_weights(w.reshape(c["c_out"], -1), c["w_bits"])
    args = (c["ksize"], c["stride"], c["padding"], c["dilation"], c["groups"])
    out = conv2d(a, packed, *args, c["a_bits"], c["a_signed"])
    want = reference.conv2d(a, w, c["stride"], c["padding"], c["dilation"], c["groups"])
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conv_cases())
def test_conv_bit_exact(kernel_path: str, c: dict) -> None:
    _check(c)


@pytest.mark.parametrize("a_signed", [True, False])
def test_resnet_like_and_depthwise(kernel_path: str, a_signed: bool) -> None:
    base = dict(b=1, stride=(1, 1), padding=(1, 1), dilation=(1, 1), a_bits=8, a_signed=a_signed, fill="random")
    _check({**base, "groups": 1, "c_in": 16, "c_out": 24, "ksize": (3, 3), "hw": (10, 9), "w_bits": 4, "seed": 1})
    _check({**base, "groups": 32, "c_in": 32, "c_out": 32, "ksize": (3, 3), "hw": (8, 8), "w_bits": 2, "seed": 2})
    _check({**base, "groups": 1, "c_in": 64, "c_out": 8, "ksize": (1, 1), "hw": (7, 7), "w_bits": 8, "seed": 3})


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conv_cases())
def test_conv_bit_exact_many(kernel_path: str, c: dict) -> None:
    _check(c)


def test_bad_conv_input() -> None:
    w = pack_weights(np.zeros((4, 2 * 3 * 3), np.int8), 4)
    a = np.zeros((1, 4, 5, 5), np.int8)
    with pytest.raises(BitmixError, match="groups"):
        conv2d(a, w, (3, 3), (1, 1), (0, 0), (1, 1), 3, 8, True)
    with pytest.raises(BitmixError, match="w: packed K"):
        conv2d(a, w, (3, 3), (1, 1), (0, 0), (1, 1), 1, 8, True)
    with pytest.raises(BitmixError, match="a_codes"):
        conv2d(np.full((1, 4, 5, 5), 9), w, (3, 3), (1, 1), (0, 0), (1, 1), 2, 4, True)
    with pytest.raises(BitmixError, match="a_codes"):
        conv2d(a[0], w, (3, 3), (1, 1), (0, 0), (1, 1), 2, 8, True)
    with pytest.raises(BitmixError, match="a_codes"):
        conv2d(a.astype(np.float64), w, (3, 3), (1, 1), (0, 0), (1, 1), 2, 8, True)
    with pytest.raises(BitmixError, match="a_codes"):
        conv2d(np.zeros((1, 4, 2, 2), np.int8), w, (3, 3), (1, 1), (0, 0), (1, 1), 2, 8, True)
    with pytest.raises(BitmixError, match="stride"):
        conv2d(a, w, (3, 3), (0, 1), (0, 0), (1, 1), 2, 8, True)
