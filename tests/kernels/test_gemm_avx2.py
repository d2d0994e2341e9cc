"""The AVX2 broadcast GEMM (``gemm_avx2``), implicit-GEMM conv and fused linear (``linear_avx2``):
bit-exact against the integer reference, forced onto the ``avx2`` path (any x86 with AVX2), with the
operand extremes that would saturate ``vpmaddubsw`` if the kernel's bounds were wrong."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bitmix.kernels import dispatch, gemm, gemm_avx2, linear_avx2, pack_weights, prepare_linear, qconv2d_nhwc, reference
from bitmix.kernels.cpu import available_paths
from bitmix.kernels.limits import max_weight_k
from bitmix.kernels.pack import code_range

from .conftest import random_codes


@pytest.fixture(params=["serial", "parallel"])
def avx2(request, monkeypatch) -> Iterator[list]:
    """Force the avx2 path; yields the names of the AVX2 broadcast kernels called (so a test fails if
    the product silently ran on another kernel)."""
    if "avx2" not in available_paths():
        pytest.skip("CPU cannot run the avx2 path")
    calls: list[str] = []
    for owner, name in ((gemm_avx2, "run"), (gemm_avx2, "conv_gemm"), (linear_avx2.Avx2Linear, "__call__")):
        original = getattr(owner, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    with dispatch.use("avx2", serial=request.param == "serial"):
        yield calls


def _extreme(shape, bits: int, signed: bool, pattern: str) -> np.ndarray:
    lo, hi = code_range(bits, signed)
    if pattern == "checker":  # alternating extremes: every vpmaddubsw pair mixes them
        return np.where(np.indices(shape).sum(axis=0) % 2 == 0, lo, hi).astype(np.int16)
    return np.full(shape, lo if pattern == "min" else hi, dtype=np.int16)


@pytest.mark.parametrize("w_bits", [8, 4, 2])
@pytest.mark.parametrize(("a_bits", "a_signed"), [(8, True), (8, False), (4, False), (2, True)])
@pytest.mark.parametrize("k", [4, 12, 100, 700])  # one K step (the odd-step tail alone), odd and even step counts
def test_gemm_extremes_do_not_saturate(avx2, w_bits, a_bits, a_signed, k) -> None:
    """Largest weight bytes (u = 255 for 8-bit: a lone pair would be 2 * 255 * -128 = -65280) against
    the most negative activation bytes, and mixed patterns; 4..9 rows and a partial 8-channel block."""
    for a_pat in ("min", "max", "checker"):
        for w_pat in ("min", "max", "checker"):
            w = _extreme((21, k), w_bits, True, w_pat).astype(np.int8)
            for m in (4, 9):
                a = _extreme((m, k), a_bits, a_signed, a_pat)
                np.testing.assert_array_equal(gemm(a, pack_weights(w, w_bits), a_bits, a_signed), reference.gemm(a, w))
    assert avx2 and set(avx2) == {"run"}


@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_gemm_random_shapes(avx2, w_bits) -> None:
    rng = np.random.default_rng(w_bits)
    for m, n, k in ((4, 16, 4), (5, 8, 64), (67, 70, 129), (130, 200, 33), (64, 64, 576)):
        for a_bits, a_signed in ((8, True), (8, False), (4, False)):
            w = random_codes(rng, (n, k), w_bits).astype(np.int8)
            a = random_codes(rng, (m, k), a_bits, a_signed)
            np.testing.assert_array_equal(gemm(a, pack_weights(w, w_bits), a_bits, a_signed), reference.gemm(a, w))
    assert set(avx2) == {"run"}


@pytest.mark.parametrize(("m", "n", "k"), [(4, 16, 1), (5, 17, 6), (7, 31, 13), (6, 9, 35), (13, 40, 261)])
@pytest.mark.parametrize(("a_bits", "a_signed"), [(8, True), (8, False)])
def test_w8_gemm_edges_are_exact(avx2, m: int, n: int, k: int, a_bits: int, a_signed: bool) -> None:
    """The 16-bit ``vpmaddwd`` tile of 8-bit weights (even and odd bytes of a K step widened apart) on K not a
    multiple of 4 or 8, ``m`` not a multiple of 4, ``n`` not a multiple of 16: the extreme weights -128 and 127
    against activation codes at both ends of the signed and unsigned byte ranges, in every combination of a
    K step's byte positions (checker patterns along K and across rows), and random codes."""
    rng = np.random.default_rng(m * n + k)
    lo, hi = code_range(8)
    alo, ahi = code_range(a_bits, a_signed)
    ws = [np.full((n, k), lo), np.full((n, k), hi), np.where(np.indices((n, k)).sum(0) % 2 == 0, lo, hi),
          np.where(np.arange(k) % 4 < 2, lo, hi)[None].repeat(n, 0), rng.integers(lo, hi, (n, k), endpoint=True)]
    acts = [np.full((m, k), alo), np.full((m, k), ahi), np.where(np.indices((m, k)).sum(0) % 3 == 0, alo, ahi),
            np.where(np.arange(k) % 4 >= 2, alo, ahi)[None].repeat(m, 0),
            rng.integers(alo, ahi, (m, k), endpoint=True)]
    for wc in ws:
        packed = pack_weights(wc.astype(np.int8), 8)
        for a in acts:
            a = a.astype(np.int16)
            np.testing.assert_array_equal(gemm(a, packed, a_bits, a_signed), reference.gemm(a, wc))
    assert set(avx2) == {"run"}


@pytest.mark.parametrize(("w_code", "a_code", "a_signed"), [(127, -128, True), (-128, -128, True),
                                                            (-128, 255, False), (127, 0, False)])
def test_w8_gemm_at_the_longest_k_is_exact(avx2, w_code: int, a_code: int, a_signed: bool) -> None:
    """The s32 accumulator bound at the longest weight row (``limits.max_weight_k``): every product at its largest
    magnitude, ``u = code + 128`` times the shifted activation byte (-128 for unsigned code 0), summed over K."""
    k = max_weight_k()
    wc = np.full((18, k), w_code, dtype=np.int8)
    wc[1::3, -5:] = 0  # rows whose sums differ from the others' by a partial last K step
    a = np.full((5, k), a_code, dtype=np.int16)
    np.testing.assert_array_equal(gemm(a, pack_weights(wc, 8), 8, a_signed), reference.gemm(a, wc))
    assert set(avx2) == {"run"}


CONVS = [  # (c_in, c_out, k, stride, pad, dil, w_bits, a_bits, a_signed)
    (3, 64, 7, 2, 3, 1, 8, 8, False),  # a ResNet stem: 8-bit weights, one K step per tap
    (64, 24, 3, 1, 1, 1, 4, 4, False),
    (5, 12, 3, 2, 1, 2, 2, 8, True),
    (16, 40, 1, 1, 0, 1, 4, 8, True),
    (12, 17, 1, 2, 0, 1, 8, 4, False),
    # one K run longer than gemm_avx2.chunk_steps' s16 chunk (72 steps beside unsigned 4-bit codes, 364 beside
    # unsigned 2-bit ones, 8 beside 8-bit ones): the "max"/"min" fills sum whole chunks at the bound
    (400, 20, 1, 1, 0, 1, 4, 4, False),
    (1500, 20, 1, 1, 0, 1, 4, 2, False),
    (72, 20, 1, 1, 0, 1, 4, 8, True),
    (400, 20, 1, 1, 0, 1, 2, 8, False),
    # 8-bit weights: C not a multiple of 4 (pad bytes inside every tap's K run), odd strides and channel counts
    (5, 20, 3, 1, 1, 1, 8, 8, True),
    (7, 33, 3, 2, 1, 1, 8, 8, False),
    (19, 16, 1, 1, 0, 1, 8, 8, True),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("fill", ["random", "extreme", "max", "min"])
def test_implicit_gemm_conv_exact(avx2, case, fill) -> None:
    c, n, k, stride, pad, dil, w_bits, a_bits, a_signed = case
    rng = np.random.default_rng(c * n + k)
    lo, hi = code_range(w_bits)
    step = np.float32(0.05)
    if fill == "random":
        x = rng.normal(0, 2, size=(2, c, 10, 9)).astype(np.float32)
        wc = rng.integers(lo, hi, (n, c, k, k), endpoint=True).astype(np.int8)
    elif fill == "extreme":  # codes clip to the range ends; the largest weights meet them (padding meets code 0)
        x = np.where(rng.random((2, c, 10, 9)) < 0.5, -1e3, 1e3).astype(np.float32)
        wc = np.where(rng.random((n, c, k, k)) < 0.2, lo, hi).astype(np.int8)
    else:  # every code at the top (bottom) of its range, every weight byte at its largest: sums at the s16 bound
        x = np.full((2, c, 10, 9), 1e3 if fill == "max" else -1e3, dtype=np.float32)
        wc = np.full((n, c, k, k), hi, dtype=np.int8)
    w = pack_weights(wc.reshape(n, -1), w_bits)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    got = qconv2d_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, scales, step, a_bits, a_signed, bias,
                       (k, k), (stride, stride), (pad, pad), (dil, dil), 1)
    codes = torch.round(torch.clamp(torch.from_numpy(x) / step, *code_range(a_bits, a_signed)))
    acc = reference.conv2d(codes.numpy().astype(np.int64), wc, (stride, stride), (pad, pad), (dil, dil))
    want = torch.from_numpy(acc.astype(np.float32)) * torch.from_numpy(step * scales)[None, :, None, None]
    want = want + torch.from_numpy(bias)[None, :, None, None]
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())
    assert avx2 == ["conv_gemm"]


@pytest.mark.parametrize(("w_bits", "a_bits", "a_signed"), [(8, 8, True), (8, 8, False), (4, 8, True), (2, 4, False)])
def test_fused_linear_exact(avx2, w_bits, a_bits, a_signed) -> None:
    rng = np.random.default_rng(w_bits + a_bits)
    n, k = 37, 260
    lo, hi = code_range(w_bits)
    for m, extreme in ((4, True), (70, False), (13, True)):
        if extreme:
            x = np.where(rng.random((m, k)) < 0.5, -1e4, 1e4).astype(np.float32)
            wc = np.where(rng.random((n, k)) < 0.3, lo, hi).astype(np.int8)
        else:
            x = (rng.normal(size=(m, k)) * 3).astype(np.float32)
            wc = rng.integers(lo, hi, (n, k), endpoint=True).astype(np.int8)
        scales = rng.uniform(0.01, 0.1, n).astype(np.float32)
        bias = rng.normal(size=n).astype(np.float32)
        a_scale = rng.uniform(0.5, 2.0, k).astype(np.float32)
        step = np.float32(0.07)
        got = prepare_linear(pack_weights(wc, w_bits), scales, step, a_bits, a_signed, bias, a_scale)(x)
        codes = np.rint(np.clip((x * a_scale) / step, *code_range(a_bits, a_signed)))
        acc = reference.gemm(codes.astype(np.int64), wc)
        np.testing.assert_array_equal(got, acc.astype(np.float32) * (step * scales)[None, :] + bias)
    assert avx2 == ["__call__"] * 3


@pytest.mark.parametrize("clamp", [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf), (-1.5, 0.25), (-np.inf, -3.0),
                                   (40.0, np.inf), (2.0, 2.0)],
                         ids=["relu", "relu6", "none", "narrow", "all-below", "all-above", "point"])
@pytest.mark.parametrize("spec", [(8, False, 0), (8, True, 0), (4, True, 0), (2, False, 0), (8, False, 128)],
                         ids=["u8", "s8", "s4", "u2", "u8-shifted"])
def test_codes_bounds_fold_the_clamp_into_one_clip_bit_for_bit(clamp: tuple, spec: tuple) -> None:
    """The full-block codes epilogue clips ``y / step`` once to ``codes_bounds``; that equals clamping ``y``,
    dividing and clipping to the code range (``_pad_codes``' formula) for every float32 ``y``, the clamp's
    ends, their neighbours and quotients near code boundaries included, and clamps outside the code range."""
    bits, signed, shift = spec
    qlo, qhi = code_range(bits, signed)
    rng = np.random.default_rng(bits * 7 + shift)
    for step in (np.float32(0.05), np.float32(0.3), np.float32(1e-3), np.float32(7.0)):
        ends = np.array([c for c in clamp if np.isfinite(c)], dtype=np.float32)
        near = np.concatenate([ends, np.nextafter(ends, np.float32(np.inf)), np.nextafter(ends, np.float32(-np.inf))])
        halves = (np.arange(qlo - 2, qhi + 3, dtype=np.float32) + np.float32(0.5)) * step
        y = np.concatenate([rng.normal(0, 4, 20000).astype(np.float32), near, halves,
                            np.nextafter(halves, np.float32(np.inf)), np.nextafter(halves, np.float32(-np.inf)),
                            np.array([0.0, -0.0, 1e30, -1e30], dtype=np.float32)])
        lo_c, hi_c = np.float32(clamp[0]), np.float32(clamp[1])
        clamped = np.where(y < lo_c, lo_c, np.where(y > hi_c, hi_c, y))
        want = np.rint(np.clip(clamped / step, np.float32(qlo), np.float32(qhi))).astype(np.int32) - shift
        q = gemm_avx2.codes_bounds(clamp, (step, qlo, qhi, shift))
        got = np.rint(np.clip(y / q[0], q[1], q[2])).astype(np.int32) - int(q[3])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [16, 37])  # whole 16-channel blocks only; a partial last block
def test_conv_without_bias_is_bit_identical(avx2, n: int) -> None:
    """A conv without bias: the full-block epilogue adds -0.0s (``gemm_avx2.no_bias``), which must leave every
    float's bits as the reference ``float32(acc) * scale`` has them (compared as int32 bit patterns)."""
    rng = np.random.default_rng(n)
    c, k = 8, 3
    lo, hi = code_range(4)
    x = rng.normal(0, 2, size=(2, 10, 9, c)).astype(np.float32)
    x[:, :5] = 0  # zero products: 0.0 outputs, -0.0 where the scale is negative
    wc = rng.integers(lo, hi, (n, c, k, k), endpoint=True).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, n).astype(np.float32) * np.where(np.arange(n) % 2 == 0, 1, -1).astype(np.float32)
    step = np.float32(0.05)
    got = qconv2d_nhwc(x, pack_weights(wc.reshape(n, -1), 4), scales, step, 8, True, None, (k, k), (1, 1), (1, 1),
                       (1, 1), 1)
    codes = np.rint(np.clip(x.transpose(0, 3, 1, 2) / step, *code_range(8, True)))
    acc = reference.conv2d(codes.astype(np.int64), wc, (1, 1), (1, 1), (1, 1))
    want = (acc.astype(np.float32) * (step * scales)[None, :, None, None]).transpose(0, 2, 3, 1)
    assert (want == 0).any() and (np.signbit(want) & (want == 0)).any()  # -0.0 outputs are there to keep
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.int32), np.ascontiguousarray(want).view(np.int32))
    assert avx2 == ["conv_gemm"]


def test_tile_codes_bounds_multiply_rounds_to_the_quotients_code_unless_flagged() -> None:
    """``store_codes_4x16``'s shortcut in numpy: ``x = y * recip`` farther than ``0.5 - near`` from its rounding takes
    ``clip(rint(x), rint(lo), rint(hi))``, which must equal ``rint(clip(y / step, lo, hi))`` for float32 ``y``:
    quotients at and one to three ulps around every half-code, huge ones (the int32 conversion overflows: flagged),
    and steps whose reciprocal is not normal (every value flagged)."""
    rng = np.random.default_rng(5)
    flagged = 0
    with np.errstate(over="ignore"):  # quotients and products past float32's range are part of the test
        for step in (0.05, 0.3, 1e-3, 7.0, 0.0137, 3e-5, 1e38, 2.0**-20):
            step = np.float32(step)
            for clamp, quant in (((0.0, 6.0), (step, 0, 255, 0)), ((-np.inf, np.inf), (step, -128, 127, 0)),
                                 ((-1.5, 0.25), (step, -8, 7, 0)), ((0.0, np.inf), (step, 0, 255, 128))):
                q = gemm_avx2.tile_codes_bounds(clamp, quant)
                assert q.dtype == np.float32 and q.shape == (8,) and (q[6], q[7]) == (np.rint(q[1]), np.rint(q[2]))
                up = down = (np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)) * step
                near = [up]
                for _ in range(3):
                    up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
                    near += [up, down]
                extremes = np.array([0, -0.0, 1e30, -1e30, 3e38, -3e38, np.inf, -np.inf], np.float32) * step
                y = np.concatenate([*near, rng.normal(0, 300, 50000).astype(np.float32) * step, extremes])
                want = np.rint(np.clip(y / q[0], q[1], q[2]))
                x = y * q[4]
                k = np.where(np.abs(x) < 2.0**31, np.rint(x), -(2.0**31)).astype(np.float32)  # vcvtps2dq
                off = np.abs(x - k)
                fast = off < q[5]
                flagged += int((~fast).sum())
                np.testing.assert_array_equal(np.clip(k, q[6], q[7])[fast], want[fast])
                if step >= 1e38:
                    assert q[5] < 0 and not fast.any()  # 1 / 1e38 is subnormal: the division everywhere
    assert flagged > 0


@pytest.mark.parametrize("n", [400, 392])  # whole 16-channel blocks (the tile store), and a partial last block
@pytest.mark.parametrize("spec", [(0, 255, 0), (-128, 127, 0), (-8, 7, 0), (0, 3, 0), (0, 255, 128)],
                         ids=["u8", "s8", "s4", "u2", "u8-shifted"])
@pytest.mark.parametrize("clamp", [(0.0, 6.0), (-np.inf, np.inf), (-1.5, 0.25), (40.0, np.inf)],
                         ids=["relu6", "none", "narrow", "all-above"])
@pytest.mark.parametrize("step", [np.float32(0.05), np.float32(0.0213), np.float32(1e38)],
                         ids=["0.05", "0.0213", "huge"])  # huge: 1 / step is subnormal, every tile divides
def test_codes_epilogue_at_half_codes_and_extremes_is_exact(avx2, n: int, spec: tuple, clamp: tuple,
                                                           step: np.float32) -> None:
    """The codes epilogue (``conv_codes_gemm``) against ``_pad_codes``' formula on outputs placed exactly: zero weights
    make every output its channel's bias, set at half-codes and up to three ulps either side (where ``y * (1 /
    step)`` rounds to another code than ``y / step`` for 2-7 %: the division must take over), at codes, past the
    code range's ends, and at +-1e30 (the int32 conversion overflows); 35 and 198 pixels (a last tile of 3 rows;
    several tasks), into an unpadded and a padded next buffer."""
    qlo, qhi, shift = spec
    rng = np.random.default_rng(n + qhi)
    ks = rng.integers(qlo - 3, qhi + 3, n).astype(np.float32)
    if step > 1e37:  # finite biases
        ks = np.clip(ks, -3, 2)
    bias = (ks + np.float32(0.5)) * step
    for _ in range(3):
        move = rng.integers(-1, 2, n)
        bias = np.where(move == 0, bias, np.nextafter(bias, np.where(move > 0, np.inf, -np.inf).astype(np.float32)))
    pick = rng.random(n)
    bias = np.where(pick < 0.1, ks * step, np.where(pick > 0.95, np.float32(1e30) * np.sign(pick - 0.975), bias))
    bias = bias.astype(np.float32)
    scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
    w = pack_weights(np.zeros((n, 12), dtype=np.int8), 4)
    lo_c, hi_c = np.float32(clamp[0]), np.float32(clamp[1])
    y = np.where(bias < lo_c, lo_c, np.where(bias > hi_c, hi_c, bias))
    with np.errstate(over="ignore"):
        want = (np.rint(np.clip(y / step, np.float32(qlo), np.float32(qhi))).astype(np.int32) - shift).astype(np.int8)
    for nb, hw, pad in ((1, (5, 7), (0, 0)), (2, (9, 11), (1, 1))):
        h, wd = hw
        m = nb * h * wd
        geom = (1, 1, 1, 1, 0, 0, 1, 1, 1, h, wd)
        a8 = rng.integers(-128, 128, (nb, h, wd, 12)).astype(np.int8)
        psum = a8.astype(np.int64).sum(axis=-1).reshape(-1)
        c4 = n if pad == (0, 0) else -(-n // 4) * 4
        padded = (nb, h + 2 * pad[0], wd + 2 * pad[1], c4)
        out8 = np.full(padded, 99, dtype=np.int8)
        run = gemm_avx2.conv_codes_gemm(w, 0, 12, geom, h, wd, m, scale, bias, clamp, not dispatch.settings.serial,
                                        padded, pad, (step, qlo, qhi, shift))
        run(a8.reshape(-1), psum, out8.reshape(-1))
        inner = out8[:, pad[0]:pad[0] + h, pad[1]:pad[1] + wd, :n]
        np.testing.assert_array_equal(inner, np.broadcast_to(want, inner.shape))
        assert (out8[:, : pad[0]] == 99).all() and (out8[..., n:] == 99).all()  # nothing written past the interior


@pytest.mark.parametrize("c", [12, 7, 70])  # one K run of 3, 2 (a pad channel) and 18 steps
def test_w8_codes_epilogue_is_exact(avx2, c: int) -> None:
    """The codes variant of the 8-bit-weight tile (``conv_codes_gemm``, compiled apart from the float one): random
    and extreme weights and activation bytes, a ReLU6 clamp, 7x5 pixels (a last tile of 3 rows) and 20 channels (a
    partial block), against ``_pad_codes``' formula on the integer reference's floats."""
    rng = np.random.default_rng(c)
    n, h, wd = 20, 7, 5
    c4 = -(-c // 4) * 4
    wc = np.where(rng.random((n, c)) < 0.3, np.int8(-128), rng.integers(-128, 128, (n, c))).astype(np.int8)
    wc[:3] = 127
    a8 = np.zeros((1, h, wd, c4), dtype=np.int8)
    a8[..., :c] = np.where(rng.random((1, h, wd, c)) < 0.3, -128, rng.integers(-128, 128, (1, h, wd, c)))
    psum = a8.astype(np.int64).sum(axis=-1).reshape(-1)
    scale = (rng.uniform(5e-5, 5e-4, n) * 12 / c).astype(np.float32)
    bias = rng.normal(0, 1, n).astype(np.float32)
    step, clamp, (qlo, qhi, shift) = np.float32(0.03), (0.0, 6.0), (0, 255, 128)
    acc = reference.gemm(a8.reshape(-1, c4)[:, :c].astype(np.int64), wc).astype(np.float32)
    y = np.minimum(np.maximum(acc * scale + bias, np.float32(0)), np.float32(6))
    want = (np.rint(np.clip(y / step, np.float32(qlo), np.float32(qhi))).astype(np.int32) - shift).astype(np.int8)
    out8 = np.full((1, h, wd, n), 99, dtype=np.int8)
    run = gemm_avx2.conv_codes_gemm(pack_weights(wc, 8), 0, c, (1, 1, 1, 1, 0, 0, 1, 1, 1, h, wd), h, wd, h * wd,
                                    scale, bias, clamp, not dispatch.settings.serial, out8.shape, (0, 0),
                                    (step, qlo, qhi, shift))
    run(a8.reshape(-1), psum, out8.reshape(-1))
    np.testing.assert_array_equal(out8.reshape(-1, n), want)


@pytest.mark.parametrize(("w_bits", "a_lo", "a_hi", "c"), [
    (4, -8, 7, 24), (4, -8, 7, 16), (2, -8, 7, 36),  # one s16 chunk (the 1x1 expansions of MobileNetV2)
    (4, -8, 7, 4 * 136), (4, -8, 7, 4 * 137),  # K of exactly one chunk (136 steps beside |a| <= 8), one step more
    (4, -128, 127, 4 * 8), (4, -128, 127, 4 * 9), (8, -128, 127, 24)])  # 8-bit codes: a chunk of 8 steps; 8-bit weights
@pytest.mark.parametrize("n", [144, 200, 20])  # 9 blocks (one task), 13 (a partial last block past NB_ALL), 2 (partial)
@pytest.mark.parametrize(("stride", "in_pad", "out_pad"), [(1, 0, 0), (1, 1, 0), (2, 0, 0), (1, 0, 1)],
                         ids=["flat", "padded-input", "strided", "padded-next"])
@pytest.mark.parametrize("checked", [True, False], ids=["checked", "tested"])
def test_codes_conv_on_small_k_is_exact(avx2, w_bits: int, a_lo: int, a_hi: int, c: int, n: int, stride: int,
                                        in_pad: int, out_pad: int, checked: bool) -> None:
    """The 1x1 codes conv's shortcuts (``gemm_avx2.driver``): a K within one s16 chunk widened once, rows read and
    written at their own pixel index when neither buffer is padded or strided (else the pixel walk), one task for up
    to ``NB_ALL`` blocks, and (``checked``: the input codes' bound given) blocks whose every reachable sum was checked
    skipping the half-code test (``exact_blocks``); 2 x 7 x 5 input pixels (m not a multiple of 4), random and
    extreme codes and weights, a ReLU6 clamp, outputs at half-codes and ulps beside them (zero-weight channels whose
    bias sits there: their blocks keep the test), against the integer reference and ``_pad_codes``' formula."""
    rng = np.random.default_rng(c * n + stride + 3 * in_pad + 7 * out_pad + w_bits)
    nb, h, wd = 2, 7, 5
    hp, wp = h + 2 * in_pad, wd + 2 * in_pad
    ho, wo = (hp - 1) // stride + 1, (wp - 1) // stride + 1
    c4 = -(-c // 4) * 4
    lo_w, hi_w = code_range(w_bits)
    wc = np.where(rng.random((n, c)) < 0.2, rng.choice([lo_w, hi_w], (n, c)),
                  rng.integers(lo_w, hi_w, (n, c), endpoint=True)).astype(np.int8)
    wc[::7] = 0  # these channels output their bias: half-codes and ulps around them
    a8 = np.zeros((nb, hp, wp, c4), dtype=np.int8)
    inner = np.where(rng.random((nb, h, wd, c)) < 0.3, rng.choice([a_lo, a_hi], (nb, h, wd, c)),
                     rng.integers(a_lo, a_hi, (nb, h, wd, c), endpoint=True))
    a8[:, in_pad:in_pad + h, in_pad:in_pad + wd, :c] = inner
    psum = a8.astype(np.int64).sum(axis=-1).reshape(-1)
    step = np.float32(0.3323813)
    scale = (rng.uniform(0.5, 2.0, n) * 6 / (c * max(abs(a_lo), a_hi) * max(-lo_w, hi_w))).astype(np.float32)
    bias = rng.normal(1, 2, n).astype(np.float32)
    half = (rng.integers(-2, 17, n) + np.float32(0.5)) * step
    bias[::7] = np.nextafter(half, np.where(rng.random(n) < 0.5, np.inf, -np.inf).astype(np.float32))[::7]
    bias[::14] = half[::14]
    q = gemm_avx2.tile_codes_bounds((0.0, 6.0), (step, 0, 15, 0))
    around = np.concatenate([np.nextafter(half, np.float32(to)) for to in (np.inf, -np.inf)] + [half])
    split = around[np.rint(np.clip(around * q[4], 0, 15)) != np.rint(np.clip(around / step, q[1], q[2]))]
    odd = [j for j in (3, 37) if j < n]
    wc[odd], bias[odd] = 0, split[: len(odd)]  # multiplied, these round to another code: blocks 0 and 2 keep the test
    acc = reference.gemm(a8[:, ::stride, ::stride, :c].reshape(-1, c).astype(np.int64), wc).astype(np.float32)
    y = np.minimum(np.maximum(acc * scale + bias, np.float32(0)), np.float32(6))
    want = np.rint(np.clip(y / step, np.float32(0), np.float32(15))).astype(np.int8).reshape(nb, ho, wo, n)
    padded = (nb, ho + 2 * out_pad, wo + 2 * out_pad, n)
    out8 = np.full(padded, 99, dtype=np.int8)
    geom = (1, 1, stride, stride, 0, 0, 1, 1, 1, ho, wo)
    run = gemm_avx2.conv_codes_gemm(pack_weights(wc, w_bits), 0, c, geom, hp, wp, nb * ho * wo, scale, bias,
                                    (0.0, 6.0), not dispatch.settings.serial, padded, (out_pad, out_pad),
                                    (step, 0, 15, 0), a_max=gemm_avx2.byte_bound(a_lo, a_hi, 0),
                                    code_max=max(-a_lo, a_hi) if checked else None)
    run(a8.reshape(-1), psum, out8.reshape(-1))
    np.testing.assert_array_equal(out8[:, out_pad:out_pad + ho, out_pad:out_pad + wo], want)
    if out_pad:
        assert (out8[:, 0] == 99).all() and (out8[:, :, 0] == 99).all()  # nothing written on the border


def test_exact_blocks_flag_only_blocks_whose_every_sum_rounds_alike() -> None:
    """``exact_blocks`` against brute force: a block holding one channel whose only reachable sum (zero weights: 0,
    so the output is its bias) multiplies to another code than it divides to keeps the half-code test; the others,
    whose every sum within ``code_max * sum |w|`` agrees, skip it; a partial last block is never flagged (it stores
    through ``store_codes_x8``, which divides); too many sums to check, or a step whose reciprocal is not normal, flag
    none."""
    rng = np.random.default_rng(11)
    step = np.float32(0.3323813)
    q = gemm_avx2.tile_codes_bounds((0.0, 6.0), (step, 0, 15, 0))
    half = (np.arange(16, dtype=np.float32) + np.float32(0.5)) * step
    near = np.concatenate([half] + [np.nextafter(half, np.float32(s)) for s in (np.inf, -np.inf)]).astype(np.float32)
    split = next(b for b in near if np.rint(np.clip(b * q[4], 0, 15)) != np.rint(np.clip(b / step, q[1], q[2])))
    n, k = 56, 24
    wc = rng.integers(-8, 8, (n, k)).astype(np.int8)
    wc[20] = 0
    scale = (rng.uniform(0.5, 2, n) * 6 / (k * 64)).astype(np.float32)
    bias = rng.normal(1, 1, n).astype(np.float32)
    bias[20] = split
    w = pack_weights(wc, 4)
    flags = gemm_avx2.exact_blocks(w, 8, scale, bias, q)
    reach = 8 * np.abs(wc.astype(np.int64)).sum(axis=1)
    want = []
    for b in range(n // 16):
        agree = True
        for j in range(16 * b, 16 * b + 16):
            y = np.arange(-reach[j], reach[j] + 1).astype(np.float32) * scale[j] + bias[j]
            agree &= bool((np.clip(np.rint(y * q[4]), q[6], q[7]) == np.rint(np.clip(y / step, q[1], q[2]))).all())
        want.append(agree)
    assert flags.tolist() == [*map(float, want), 0.0] and want == [True, False, True]
    assert not gemm_avx2.exact_blocks(w, 10**6, scale, bias, q).any()  # more sums than MAX_CHECKED
    huge = gemm_avx2.tile_codes_bounds((0.0, 6.0), (np.float32(1e38), 0, 15, 0))
    assert not gemm_avx2.exact_blocks(w, 8, scale, bias, huge).any()
