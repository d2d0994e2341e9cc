"""``PreparedConv``: the checked-once call of a lowered conv gives ``qconv2d_nhwc``'s results and errors."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.errors import BitmixError
from bitmix.kernels import dispatch, pack_weights, qconv2d_nhwc
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


EPILOGUE_CASES = [  # (c_in, c_out, k, stride, groups): implicit GEMM with a partial block, 1x1, depthwise
    (6, 70, 3, 1, 1),
    (16, 20, 1, 1, 1),
    (12, 12, 3, 2, 12),
]


@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("clamp", [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf)], ids=["relu", "relu6", "none"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_fused_epilogue_equals_separate_ops(kernel_path: str, case: tuple, clamp: tuple, with_residual: bool) -> None:
    """``clamp(conv(x) + r)`` in the kernel's epilogue == the conv, then numpy's add and the clamp
    (NaN in the residual kept, as torch's relu/hardtanh keep it)."""
    c, n, k, stride, groups = case
    rng = np.random.default_rng(c + n + k)
    w = pack_weights(rng.integers(-8, 8, (n, c // groups * k * k)).astype(np.int8), 4)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    args = (w, scales, 0.05, 8, True, rng.normal(size=n).astype(np.float32), (k, k), (stride, stride),
            (k // 2, k // 2), (1, 1), groups)
    conv = PreparedConv(*args)
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])
    for _ in range(2):  # the checked first call, then the fast path
        x = rng.normal(0, 2, size=(2, 9, 11, c)).astype(np.float32)
        want = qconv2d_nhwc(x, *args)
        res = None
        if with_residual:
            res = rng.normal(0, 3, size=want.shape).astype(np.float32)
            res[0, 1, 2, 3] = np.nan
            want = want + res
        want = np.where(want < lo, lo, want)
        want = np.where(want > hi, hi, want)
        got = conv(x, True, res, (lo, hi))
        np.testing.assert_array_equal(got, want)
        assert np.isnan(got[0, 1, 2, 3]) == with_residual


def test_residual_of_the_wrong_shape_is_an_error() -> None:
    w = pack_weights(np.ones((4, 9), dtype=np.int8), 4)
    conv = PreparedConv(w, np.ones(4, dtype=np.float32), 0.05, 8, True, None, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(BitmixError, match="residual"):
        conv(np.ones((1, 5, 5, 1), dtype=np.float32), True, np.ones((1, 5, 5, 3), dtype=np.float32))


@pytest.mark.parametrize("nxt_geometry", [(1, 1, 0), (3, 1, 1), (3, 2, 1)], ids=["1x1", "3x3", "3x3-stride2"])
@pytest.mark.parametrize("spec", [(8, False), (4, True), (8, True)], ids=["u8", "s4", "s8"])
def test_depthwise_codes_for_the_next_conv_equal_its_float_path(kernel_path: str, nxt_geometry: tuple,
                                                                 spec: tuple) -> None:
    """A depthwise conv quantizing its output for the next conv (``to_codes``: the integer pipeline) gives
    that conv exactly ``_pad_codes``' codes of the floats, so the next conv's result is bit-identical."""
    from bitmix.kernels.conv_nhwc import _pad_codes, implicit_route
    from bitmix.kernels.matmul import check_activation_spec
    from bitmix.kernels.padded import PaddedCodes

    k, stride, pad = nxt_geometry
    a_bits, a_signed = spec
    rng = np.random.default_rng(k * 10 + a_bits)
    c, n = 22, 20  # 22 channels: the padded buffer has 2 pad channels per pixel
    dw = PreparedConv(pack_weights(rng.integers(-8, 8, (c, 9)).astype(np.int8), 4),
                      rng.uniform(0.01, 0.1, c).astype(np.float32), 0.05, 8, True,
                      rng.normal(size=c).astype(np.float32), (3, 3), (1, 1), (1, 1), (1, 1), c)
    nxt = PreparedConv(pack_weights(rng.integers(-8, 8, (n, c * k * k)).astype(np.int8), 4),
                       rng.uniform(0.01, 0.1, n).astype(np.float32), 0.04, a_bits, a_signed, None, (k, k),
                       (stride, stride), (pad, pad), (1, 1), 1)
    x = rng.normal(0, 2, size=(2, 9, 11, c)).astype(np.float32)
    clamp = (np.float32(-1.5), np.float32(6.0))
    assert dw.to_codes(x, True, clamp, nxt) is None  # neither layer has run at these shapes yet
    y = dw(x, True, None, clamp)
    ref = nxt(y, True)
    codes = dw.to_codes(x, True, clamp, nxt)
    ho, wo = ref.shape[1], ref.shape[2]
    if implicit_route(nxt.w, y.shape[0] * ho * wo, (k, k, stride, stride, pad, pad, 1, 1, 1, ho, wo)) is None:
        assert codes is None
        return
    assert isinstance(codes, PaddedCodes) and codes.shape == (2, c, 9, 11)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    a8 = np.zeros_like(codes.a8)
    psum = np.zeros_like(codes.psum)
    _pad_codes(y, True, np.float32(0.04), lo, hi, shift, pad, pad, a8, psum)
    np.testing.assert_array_equal(codes.a8, a8)
    np.testing.assert_array_equal(codes.psum, psum)
    np.testing.assert_array_equal(nxt(codes, True), ref)
    residual = rng.normal(size=ref.shape).astype(np.float32)
    np.testing.assert_array_equal(nxt(codes, True, residual, clamp), nxt(y, True, residual, clamp))
    with pytest.raises(BitmixError, match="another layer"):
        dw(codes, True)


def test_bound_launch_follows_the_dispatch_settings() -> None:
    """A launch bound under one path, or serial/parallel setting, is not reused under another: each call's
    result is ``qconv2d_nhwc``'s under the settings in force."""
    from bitmix.kernels import dispatch
    from bitmix.kernels.cpu import available_paths

    rng = np.random.default_rng(3)
    w = pack_weights(rng.integers(-8, 8, (20, 8 * 9)).astype(np.int8), 4)
    args = (w, rng.uniform(0.01, 0.1, 20).astype(np.float32), 0.05, 8, False, None, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    conv = PreparedConv(*args)
    x = rng.normal(0, 2, size=(1, 6, 7, 8)).astype(np.float32)
    for path in [p for p in ("avx512vnni", "avx2", "portable", "avx512vnni") if p in available_paths()]:
        for serial in (True, False):
            with dispatch.use(path, serial=serial):
                want = qconv2d_nhwc(x, *args)
                for _ in range(2):
                    np.testing.assert_array_equal(conv(x, True), want)
                launch = conv._launches[((x.shape, True), False, (np.float32(-np.inf), np.float32(np.inf)))]
                assert launch[0] is dispatch.settings



@pytest.mark.parametrize("first", [(3, 1, 1, 20), (3, 2, 1, 22), (1, 1, 0, 70)],
                         ids=["3x3-n20", "3x3s2-n22", "1x1-n70"])
@pytest.mark.parametrize("spec", [(8, False), (4, True), (2, False)], ids=["u8", "s4", "u2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_codes_for_the_next_conv_equal_its_float_path(kernel_path: str, first: tuple, spec: tuple,
                                                          bias: bool) -> None:
    """A one-group conv writing the next conv's input codes from its GEMM epilogue (``CodesConv``, VNNI or AVX2)
    gives exactly ``_pad_codes``' codes and sums of its float output (22 channels: pad channels; 70: a partial
    16-channel block), and a chain of three (codes in, codes out) ends bit-identical to the float path."""
    from bitmix.kernels.conv_nhwc import _pad_codes
    from bitmix.kernels.matmul import check_activation_spec
    from bitmix.kernels.padded import PaddedCodes

    k, stride, pad, n = first
    a_bits, a_signed = spec
    rng = np.random.default_rng(k * 100 + n + a_bits)
    c = 12
    a = _random_conv(rng, n, c, 4, 0.05, (8, False), bias, k, stride, pad)
    b = _random_conv(rng, n, n, 2, 0.04, spec, True, 3, 1, 1)
    last = _random_conv(rng, 9, n, 4, 0.03, (4, True), False, 1, 1, 0)
    x = np.abs(rng.normal(0, 2, size=(2, 9, 11, c))).astype(np.float32)
    relu, wide = (np.float32(0), np.float32(np.inf)), (np.float32(-1.5), np.float32(6.0))
    assert a.to_codes(x, True, relu, b) is None  # neither layer has run at these shapes yet
    ya = a(x, True, None, relu)
    yb = b(ya, True, None, wide)
    ref = last(yb, True)
    codes = a.to_codes(x, True, relu, b)
    if codes is None:  # not on the implicit GEMM (portable): the float path stays
        assert kernel_path == "portable"
        return
    assert isinstance(codes, PaddedCodes) and codes.shape == (2, n, ya.shape[1], ya.shape[2])
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    a8, psum = np.full_like(codes.a8, 99), np.zeros_like(codes.psum)
    _pad_codes(ya, True, np.float32(0.04), lo, hi, shift, 1, 1, a8, psum)
    np.testing.assert_array_equal(codes.a8, a8)
    np.testing.assert_array_equal(codes.psum, psum)
    np.testing.assert_array_equal(b(codes, True, None, wide), yb)
    codes_b = b.to_codes(a.to_codes(x, True, relu, b), True, wide, last)  # codes in, codes out
    assert isinstance(codes_b, PaddedCodes)
    np.testing.assert_array_equal(last(codes_b, True), ref)


@pytest.mark.parametrize("first", [(64, 3, 1, 1, 64), (64, 1, 1, 0, 70), (12, 3, 2, 1, 22), (12, 1, 1, 0, 16)],
                         ids=["3x3-c64-n64", "1x1-c64-n70", "3x3s2-c12-n22", "1x1-c12-n16"])
@pytest.mark.parametrize("spec", [(8, False), (4, True), (2, False)], ids=["u8", "s4", "u2"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("nxt_k", [1, 3])
def test_floats_and_codes_for_the_next_conv_equal_its_float_path(kernel_path: str, first: tuple, spec: tuple,
                                                                residual: bool, nxt_k: int) -> None:
    """``run_both`` (a result read by the next conv and by other ops: ``FloatsAndCodesConv`` on VNNI and AMX, its
    input as floats or codes): the floats equal ``run``'s (residual added, clamped) and the codes ``_pad_codes``' of
    them, sums included; elsewhere ``(floats, None)``. The next conv's output from the codes equals its float path."""
    from bitmix.kernels.conv_nhwc import _pad_codes
    from bitmix.kernels.matmul import check_activation_spec
    from bitmix.kernels.padded import PaddedCodes

    c, k, stride, pad, n = first
    a_bits, a_signed = spec
    rng = np.random.default_rng(c + k * 100 + n + a_bits + nxt_k)
    prev = _random_conv(rng, c, 8, 4, 0.05, (8, False), True, 1, 1, 0)
    a = _random_conv(rng, n, c, 4, 0.05, (4, True), True, k, stride, pad)
    b = _random_conv(rng, 9, n, 2, 0.04, spec, True, nxt_k, 1, nxt_k // 2)
    x = np.abs(rng.normal(0, 2, size=(2, 9, 11, 8))).astype(np.float32)
    clamp = (np.float32(0), np.float32(np.inf)) if residual else (np.float32(-1.5), np.float32(6.0))
    xa = prev(x, True)
    ya = a(xa, True)
    res = rng.normal(0, 1, size=ya.shape).astype(np.float32) if residual else None
    want = a(xa, True, res, clamp)
    yb = b(want, True)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    ref8 = np.full((2, ya.shape[1] + nxt_k - 1, ya.shape[2] + nxt_k - 1, -(-n // 4) * 4), 99, dtype=np.int8)
    ref_sums = np.zeros(ref8.shape[:3], dtype=np.int64).reshape(-1)
    _pad_codes(want, True, np.float32(0.04), lo, hi, shift, nxt_k // 2, nxt_k // 2, ref8, ref_sums)
    handed = kernel_path in ("avx512vnni", "avx512amx")
    for _ in range(2):
        for source in (xa, prev.to_codes(x, True, (np.float32(-np.inf), np.float32(np.inf)), a)):
            if source is None:  # ``prev`` hands no codes on this path
                continue
            y, codes = a.run_both(source, True, res, clamp, b)
            np.testing.assert_array_equal(y, want)
            if codes is None:
                assert not handed or source is not xa or _ == 0
                continue
            assert handed and isinstance(codes, PaddedCodes)
            np.testing.assert_array_equal(codes.a8, ref8)
            if codes.psum.size > 1:  # the AMX engine reads no sums (b's output below checks they are not needed)
                np.testing.assert_array_equal(codes.psum, ref_sums)
            np.testing.assert_array_equal(b(codes, True), yb)
    if handed:
        bad = res.copy() if residual else None
        if bad is not None:
            bad[1, 2, 3, 4] = np.nan
            y, codes = a.run_both(xa, True, bad, clamp, b)
            assert codes is None and np.isnan(y[1, 2, 3, 4])  # b then quantizes the floats and reports the NaN


@pytest.mark.parametrize("first", [(3, 2, 1, 22), (1, 1, 0, 70)], ids=["3x3s2-n22", "1x1-n70"])
@pytest.mark.parametrize("spec", [(8, False), (4, True), (2, False)], ids=["u8", "s4", "u2"])
@pytest.mark.parametrize("dw_stride", [1, 2])
def test_conv_codes_for_a_depthwise_conv_equal_its_float_path(kernel_path: str, first: tuple, spec: tuple,
                                                              dw_stride: int) -> None:
    """A one-group conv writing a depthwise conv's input codes from its GEMM epilogue (``CodesConv``, VNNI or AVX2:
    MobileNet's expansion -> depthwise) gives exactly ``_codes``' NHWC codes of its float output (uint8 ones
    for an unsigned 8-bit spec; 22 and 70 channels: no whole 16-channel block), the depthwise conv on them
    its float result, and expansion -> depthwise -> projection on codes the float path's output."""
    from bitmix.kernels.conv_nhwc import _codes
    from bitmix.kernels.matmul import check_activation_spec
    from bitmix.kernels.padded import PaddedCodes

    k, stride, pad, n = first
    a_bits, a_signed = spec
    rng = np.random.default_rng(k * 100 + n + a_bits + dw_stride)
    c = 12
    a = _random_conv(rng, n, c, 4, 0.05, (8, False), True, k, stride, pad)
    dw = _random_conv(rng, n, n, 4, 0.04, spec, True, 3, dw_stride, 1, groups=n)
    proj = _random_conv(rng, 9, n, 4, 0.03, (4, True), False, 1, 1, 0)
    x = np.abs(rng.normal(0, 2, size=(2, 17, 19, c))).astype(np.float32)
    relu6, wide = (np.float32(0), np.float32(6)), (np.float32(-1.5), np.float32(6.0))
    ya = a(x, True, None, relu6)
    ydw = dw(ya, True, None, wide)
    ref = proj(ydw, True)
    codes = a.to_codes(x, True, relu6, dw)
    if codes is None:  # not on the implicit GEMM (portable): the float path stays
        assert kernel_path == "portable"
        return
    lo, hi, _ = check_activation_spec(a_bits, a_signed)
    assert isinstance(codes, PaddedCodes) and codes.shape == (2, n, ya.shape[1], ya.shape[2])
    want = _codes(ya, True, np.float32(0.04), lo, hi)
    np.testing.assert_array_equal(codes.a8.view(want.dtype), want)
    np.testing.assert_array_equal(dw(codes, True, None, wide), ydw)
    residual = rng.normal(size=ydw.shape).astype(np.float32)
    np.testing.assert_array_equal(dw(codes, True, residual, wide), dw(ya, True, residual, wide))
    into_proj = dw.to_codes(a.to_codes(x, True, relu6, dw), True, wide, proj)  # codes in, codes out
    assert isinstance(into_proj, PaddedCodes)
    np.testing.assert_array_equal(proj(into_proj, True), ref)
    with pytest.raises(BitmixError, match="another layer"):
        proj(codes, True)


def _random_conv(rng: np.random.Generator, n: int, c: int, w_bits: int, a_step: float, spec: tuple, bias: bool,
                 k: int, stride: int, pad: int, groups: int = 1) -> PreparedConv:
    """A k x k conv of ``c`` -> ``n`` channels with random ``w_bits`` weight codes, per-channel scales (and bias)."""
    half = 2 ** (w_bits - 1)
    w = pack_weights(rng.integers(-half, half, (n, c // groups * k * k)).astype(np.int8), w_bits)
    return PreparedConv(w, rng.uniform(0.01, 0.1, n).astype(np.float32), a_step, *spec,
                        rng.normal(size=n).astype(np.float32) if bias else None, (k, k), (stride, stride), (pad, pad),
                        (1, 1), groups)


def test_an_empty_batch_is_not_cached_as_a_fast_shape() -> None:
    """An empty batch returns an empty output, and a later call at that shape still does (the fast path's implicit
    GEMM and code hand-offs assume rows); real batches before and after are unchanged."""
    rng = np.random.default_rng(0)
    w = pack_weights(rng.integers(-8, 8, (16, 8 * 9)).astype(np.int8), 4)
    conv = PreparedConv(w, np.full(16, 0.05, np.float32), 0.1, 4, True, None, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x = rng.normal(size=(2, 6, 6, 8)).astype(np.float32)
    first = conv(x, True)
    for _ in range(2):
        assert conv(x[:0], True).shape == (0, 6, 6, 16)
        assert conv(x[:0], True, clamp=(np.float32(0), np.float32(6))).shape == (0, 6, 6, 16)
    np.testing.assert_array_equal(conv(x, True), first)


def test_run_binds_each_call_signature_and_a_second_shape_gets_its_own(kernel_path: str) -> None:
    """``run`` (a lowered layer's call): expansion -> depthwise -> projection with a residual, on codes where the
    kernels can, alternating two input shapes. Every call equals the checked float path of separate convs; each
    shape's route is bound once both layers have run at it, and a residual of the other shape is still refused."""
    rng = np.random.default_rng(5)
    c, n = 8, 24
    a = _random_conv(rng, n, c, 4, 0.05, (8, False), True, 1, 1, 0)
    dw = _random_conv(rng, n, n, 4, 0.04, (4, False), True, 3, 1, 1, groups=n)
    proj = _random_conv(rng, c, n, 4, 0.03, (4, True), False, 1, 1, 0)
    twins = [PreparedConv(*(getattr(p, f) for f in ("w", "w_scales", "a_step", "a_bits", "a_signed", "bias",
                                                     "kernel_size", "stride", "padding", "dilation", "groups")))
             for p in (a, dw, proj)]
    relu6, none = (np.float32(0), np.float32(6)), (np.float32(-np.inf), np.float32(np.inf))
    shapes = [(1, 9, 11, c), (2, 5, 6, c)]
    for step in range(6):
        x = np.abs(rng.normal(0, 2, size=shapes[step % 2])).astype(np.float32)
        res = rng.normal(size=x.shape).astype(np.float32)
        want = twins[2](twins[1](twins[0](x, True, None, relu6), True, None, relu6), True, res, none)
        got = proj.run(dw.run(a.run(x, True, None, relu6, dw), True, None, relu6, proj), True, res, none, None)
        np.testing.assert_array_equal(got, want)
        bound = {key[0][:1] for conv in (a, dw, proj) for key in conv._routes}
        assert len(bound) == (1 if step == 0 else 2)  # the first pass binds the last conv; both shapes after that
    assert all(route[0] is dispatch.settings for conv in (a, dw, proj) for route in conv._routes.values())
    with pytest.raises(BitmixError, match="residual"):
        x = np.abs(rng.normal(0, 2, size=shapes[0])).astype(np.float32)
        proj.run(dw.run(a.run(x, True, None, relu6, dw), True, None, relu6, proj), True,
                 np.zeros(shapes[1], np.float32), none, None)


def test_run_rebinds_under_other_dispatch_settings() -> None:
    """A route bound under one dispatch path is not reused under another: each call equals that path's result."""
    from bitmix.kernels.cpu import available_paths

    rng = np.random.default_rng(8)
    conv = _random_conv(rng, 20, 8, 4, 0.05, (8, False), False, 3, 1, 1)
    args = (conv.w, conv.w_scales, conv.a_step, conv.a_bits, conv.a_signed, conv.bias, conv.kernel_size,
            conv.stride, conv.padding, conv.dilation, conv.groups)
    x = rng.normal(0, 2, size=(1, 6, 7, 8)).astype(np.float32)
    none = (np.float32(-np.inf), np.float32(np.inf))
    for path in [p for p in ("avx2", "portable", "avx2") if p in available_paths()]:
        with dispatch.use(path):
            for _ in range(2):
                np.testing.assert_array_equal(conv.run(x, True, None, none, None), qconv2d_nhwc(x, *args))
            assert conv._routes[(x.shape, True, False, True, none, None)][0] is dispatch.settings

