"""AVX2 micro-kernels (``vpmaddubsw`` + ``vpmaddwd``); the interface is in ``isa``.

int4/int2 weights: unpack bit-planes, ``vpmaddubsw`` into s16, ``vpmaddwd`` to s32. The s16 partial
sums stay exact: one holds ``GROUP`` blocks, i.e. at most 8 ``vpmaddubsw`` results of u <= 15
(int4: 8 * 3840 = 30720) or 16 of u <= 3 (int2: 16 * 768), below 32767. 8-bit weights are
sign-extended to s16 and go straight to ``vpmaddwd`` (``vpmaddubsw`` could saturate).
"""

from __future__ import annotations

import functools

from numba import njit

from bitmix.kernels.pack import codes_per_block
from bitmix.kernels.simd import (
    add_i16x16,
    add_i32x8,
    hsum_i32x8,
    load_i8x32,
    madd_ones,
    madd_s8,
    maddubs,
    pin_kernels,
    prefetch,
    unpack_i8x32,
    zero_i16x16,
    zero_i32x8,
)

GROUP = 4  # blocks summed in int16 before one vpmaddwd (bound in the module docstring)


@functools.cache
def micro_kernels(bits: int) -> tuple[tuple, int]:
    """``((dot1x1, dot1x4, dot4x2), 0)`` for ``bits``-bit weights."""
    return _w8() if bits == 8 else _planes(bits)


def _w8():
    """8-bit weights on AVX2: sign-extend to s16 and ``vpmaddwd`` (``vpmaddubsw`` would saturate)."""

    @njit(cache=True, inline="always")
    def dot1x1(w, wo, a, ao, nblk):
        acc = zero_i32x8()
        for b in range(nblk):
            acc = add_i32x8(acc, madd_s8(load_i8x32(w, wo + 32 * b), load_i8x32(a, ao + 32 * b)))
        return hsum_i32x8(acc)

    @njit(cache=True, inline="always")
    def dot1x4(w, wo0, wo1, wo2, wo3, a, ao, nblk, pf):
        c0 = zero_i32x8()
        c1 = zero_i32x8()
        c2 = zero_i32x8()
        c3 = zero_i32x8()
        for b in range(nblk):
            if pf >= 0:
                prefetch(w, pf + 128 * b)
                prefetch(w, pf + 128 * b + 64)
            x = load_i8x32(a, ao + 32 * b)
            c0 = add_i32x8(c0, madd_s8(load_i8x32(w, wo0 + 32 * b), x))
            c1 = add_i32x8(c1, madd_s8(load_i8x32(w, wo1 + 32 * b), x))
            c2 = add_i32x8(c2, madd_s8(load_i8x32(w, wo2 + 32 * b), x))
            c3 = add_i32x8(c3, madd_s8(load_i8x32(w, wo3 + 32 * b), x))
        return hsum_i32x8(c0), hsum_i32x8(c1), hsum_i32x8(c2), hsum_i32x8(c3)

    @njit(cache=True, inline="always")
    def dot4x2(w, wo0, wo1, a, ao0, ao1, ao2, ao3, nblk):
        c00 = zero_i32x8()
        c01 = zero_i32x8()
        c10 = zero_i32x8()
        c11 = zero_i32x8()
        c20 = zero_i32x8()
        c21 = zero_i32x8()
        c30 = zero_i32x8()
        c31 = zero_i32x8()
        for b in range(nblk):
            v0 = load_i8x32(w, wo0 + 32 * b)
            v1 = load_i8x32(w, wo1 + 32 * b)
            x = load_i8x32(a, ao0 + 32 * b)
            c00 = add_i32x8(c00, madd_s8(v0, x))
            c01 = add_i32x8(c01, madd_s8(v1, x))
            x = load_i8x32(a, ao1 + 32 * b)
            c10 = add_i32x8(c10, madd_s8(v0, x))
            c11 = add_i32x8(c11, madd_s8(v1, x))
            x = load_i8x32(a, ao2 + 32 * b)
            c20 = add_i32x8(c20, madd_s8(v0, x))
            c21 = add_i32x8(c21, madd_s8(v1, x))
            x = load_i8x32(a, ao3 + 32 * b)
            c30 = add_i32x8(c30, madd_s8(v0, x))
            c31 = add_i32x8(c31, madd_s8(v1, x))
        return (
            hsum_i32x8(c00),
            hsum_i32x8(c01),
            hsum_i32x8(c10),
            hsum_i32x8(c11),
            hsum_i32x8(c20),
            hsum_i32x8(c21),
            hsum_i32x8(c30),
            hsum_i32x8(c31),
        )

    return pin_kernels("isa.avx2.8", dot1x1, dot1x4, dot4x2), 0


def _planes(bits: int):
    """int4/int2 weights on AVX2: unpack planes, ``vpmaddubsw`` into s16, ``vpmaddwd`` to s32."""
    planes = 8 // bits
    mask = (1 << bits) - 1
    cpb = codes_per_block(bits)

    @njit(cache=True, inline="always")
    def dot1x1(w, wo, a, ao, nblk):
        acc = zero_i32x8()
        for b in range(nblk):
            v = load_i8x32(w, wo + 32 * b)
            s = zero_i16x16()
            for p in range(planes):
                s = add_i16x16(s, maddubs(unpack_i8x32(v, bits * p, mask), load_i8x32(a, ao + cpb * b + 32 * p)))
            acc = add_i32x8(acc, madd_ones(s))
        return hsum_i32x8(acc)

    @njit(cache=True, inline="always")
    def dot1x4(w, wo0, wo1, wo2, wo3, a, ao, nblk, pf):
        c0 = zero_i32x8()
        c1 = zero_i32x8()
        c2 = zero_i32x8()
        c3 = zero_i32x8()
        for b0 in range(0, nblk, GROUP):
            s0 = zero_i16x16()
            s1 = zero_i16x16()
            s2 = zero_i16x16()
            s3 = zero_i16x16()
            for b in range(b0, min(b0 + GROUP, nblk)):
                if pf >= 0:
                    prefetch(w, pf + 128 * b)
                    prefetch(w, pf + 128 * b + 64)
                v0 = load_i8x32(w, wo0 + 32 * b)
                v1 = load_i8x32(w, wo1 + 32 * b)
                v2 = load_i8x32(w, wo2 + 32 * b)
                v3 = load_i8x32(w, wo3 + 32 * b)
                for p in range(planes):
                    x = load_i8x32(a, ao + cpb * b + 32 * p)
                    s0 = add_i16x16(s0, maddubs(unpack_i8x32(v0, bits * p, mask), x))
                    s1 = add_i16x16(s1, maddubs(unpack_i8x32(v1, bits * p, mask), x))
                    s2 = add_i16x16(s2, maddubs(unpack_i8x32(v2, bits * p, mask), x))
                    s3 = add_i16x16(s3, maddubs(unpack_i8x32(v3, bits * p, mask), x))
            c0 = add_i32x8(c0, madd_ones(s0))
            c1 = add_i32x8(c1, madd_ones(s1))
            c2 = add_i32x8(c2, madd_ones(s2))
            c3 = add_i32x8(c3, madd_ones(s3))
        return hsum_i32x8(c0), hsum_i32x8(c1), hsum_i32x8(c2), hsum_i32x8(c3)

    @njit(cache=True, inline="always")
    def dot4x2(w, wo0, wo1, a, ao0, ao1, ao2, ao3, nblk):
        c00 = zero_i32x8()
        c01 = zero_i32x8()
        c10 = zero_i32x8()
        c11 = zero_i32x8()
        c20 = zero_i32x8()
        c21 = zero_i32x8()
        c30 = zero_i32x8()
        c31 = zero_i32x8()
        for b0 in range(0, nblk, GROUP):
            s00 = zero_i16x16()
            s01 = zero_i16x16()
            s10 = zero_i16x16()
            s11 = zero_i16x16()
            s20 = zero_i16x16()
            s21 = zero_i16x16()
            s30 = zero_i16x16()
            s31 = zero_i16x16()
            for b in range(b0, min(b0 + GROUP, nblk)):
                v0 = load_i8x32(w, wo0 + 32 * b)
                v1 = load_i8x32(w, wo1 + 32 * b)
                for p in range(planes):
                    u0 = unpack_i8x32(v0, bits * p, mask)
                    u1 = unpack_i8x32(v1, bits * p, mask)
                    k = cpb * b + 32 * p
                    x = load_i8x32(a, ao0 + k)
                    s00 = add_i16x16(s00, maddubs(u0, x))
                    s01 = add_i16x16(s01, maddubs(u1, x))
                    x = load_i8x32(a, ao1 + k)
                    s10 = add_i16x16(s10, maddubs(u0, x))
                    s11 = add_i16x16(s11, maddubs(u1, x))
                    x = load_i8x32(a, ao2 + k)
                    s20 = add_i16x16(s20, maddubs(u0, x))
                    s21 = add_i16x16(s21, maddubs(u1, x))
                    x = load_i8x32(a, ao3 + k)
                    s30 = add_i16x16(s30, maddubs(u0, x))
                    s31 = add_i16x16(s31, maddubs(u1, x))
            c00 = add_i32x8(c00, madd_ones(s00))
            c01 = add_i32x8(c01, madd_ones(s01))
            c10 = add_i32x8(c10, madd_ones(s10))
            c11 = add_i32x8(c11, madd_ones(s11))
            c20 = add_i32x8(c20, madd_ones(s20))
            c21 = add_i32x8(c21, madd_ones(s21))
            c30 = add_i32x8(c30, madd_ones(s30))
            c31 = add_i32x8(c31, madd_ones(s31))
        return (
            hsum_i32x8(c00),
            hsum_i32x8(c01),
            hsum_i32x8(c10),
            hsum_i32x8(c11),
            hsum_i32x8(c20),
            hsum_i32x8(c21),
            hsum_i32x8(c30),
            hsum_i32x8(c31),
        )

    return pin_kernels(f"isa.avx2.{bits}", dot1x1, dot1x4, dot4x2), 0
