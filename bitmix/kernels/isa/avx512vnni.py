"""AVX-512 VNNI micro-kernels: ``vpdpbusd zmm`` over two 32-byte blocks at a time, a ymm-wide tail block.

The interface is in ``isa``. For 8-bit weights the activations become the unsigned operand
(``a8 ^ 0x80`` = a8 + 128) and the weights the signed one; the extra ``128 * row_sums`` is
returned as ``wcorr``. The ``avx512amx`` path runs these for products too small for the tile engine.
"""

from __future__ import annotations

import functools

from numba import njit

from bitmix.kernels.pack import codes_per_block
from bitmix.kernels.simd import (
    dpbusd512,
    flip_sign_i8x64,
    hsum_i32x16,
    load_i8x32,
    load_i8x64,
    pin_kernels,
    prefetch,
    unpack_i8x32,
    unpack_i8x64,
    widen_i8x32,
    zero_i8x32,
    zero_i32x16,
)


@functools.cache
def micro_kernels(bits: int) -> tuple[tuple, int]:
    """``((dot1x1, dot1x4, dot4x2), wcorr)`` for ``bits``-bit weights (``wcorr`` = 128 for 8-bit)."""
    planes = 1 if bits == 8 else 8 // bits
    mask = 0xFF if bits == 8 else (1 << bits) - 1
    cpb = codes_per_block(bits)
    w8 = bits == 8

    @njit(cache=True, inline="always")
    def _pair(w, wo, b, p):
        return unpack_i8x64(load_i8x64(w, wo + 32 * b), bits * p, mask)

    @njit(cache=True, inline="always")
    def _tail(w, wo, b, p):
        return widen_i8x32(unpack_i8x32(load_i8x32(w, wo + 32 * b), bits * p, mask), zero_i8x32())

    @njit(cache=True, inline="always")
    def _x_pair(a, ao, b, p):
        return widen_i8x32(load_i8x32(a, ao + cpb * b + 32 * p), load_i8x32(a, ao + cpb * (b + 1) + 32 * p))

    @njit(cache=True, inline="always")
    def _x_tail(a, ao, b, p):
        return widen_i8x32(load_i8x32(a, ao + cpb * b + 32 * p), zero_i8x32())

    @njit(cache=True, inline="always")
    def _dp(acc, u, x):
        if w8:
            return dpbusd512(acc, flip_sign_i8x64(x), u)
        return dpbusd512(acc, u, x)

    @njit(cache=True, inline="always")
    def dot1x1(w, wo, a, ao, nblk):
        acc = zero_i32x16()
        for b in range(0, nblk - 1, 2):
            for p in range(planes):
                acc = _dp(acc, _pair(w, wo, b, p), _x_pair(a, ao, b, p))
        if nblk % 2 == 1:
            for p in range(planes):
                acc = _dp(acc, _tail(w, wo, nblk - 1, p), _x_tail(a, ao, nblk - 1, p))
        return hsum_i32x16(acc)

    @njit(cache=True, inline="always")
    def dot1x4(w, wo0, wo1, wo2, wo3, a, ao, nblk, pf):
        c0 = zero_i32x16()
        c1 = zero_i32x16()
        c2 = zero_i32x16()
        c3 = zero_i32x16()
        for b in range(0, nblk - 1, 2):
            if pf >= 0:  # the next four rows, 256 of their bytes per step (hardware prefetch stops at pages)
                prefetch(w, pf + 128 * b)
                prefetch(w, pf + 128 * b + 64)
                prefetch(w, pf + 128 * b + 128)
                prefetch(w, pf + 128 * b + 192)
            for p in range(planes):
                x = _x_pair(a, ao, b, p)
                c0 = _dp(c0, _pair(w, wo0, b, p), x)
                c1 = _dp(c1, _pair(w, wo1, b, p), x)
                c2 = _dp(c2, _pair(w, wo2, b, p), x)
                c3 = _dp(c3, _pair(w, wo3, b, p), x)
        if nblk % 2 == 1:
            b = nblk - 1
            for p in range(planes):
                x = _x_tail(a, ao, b, p)
                c0 = _dp(c0, _tail(w, wo0, b, p), x)
                c1 = _dp(c1, _tail(w, wo1, b, p), x)
                c2 = _dp(c2, _tail(w, wo2, b, p), x)
                c3 = _dp(c3, _tail(w, wo3, b, p), x)
        return hsum_i32x16(c0), hsum_i32x16(c1), hsum_i32x16(c2), hsum_i32x16(c3)

    @njit(cache=True, inline="always")
    def _mac4x2(c, u0, u1, x0, x1, x2, x3):
        """Two unpacked weight vectors against four activation rows: 8 accumulators."""
        return (_dp(c[0], u0, x0), _dp(c[1], u1, x0), _dp(c[2], u0, x1), _dp(c[3], u1, x1),
                _dp(c[4], u0, x2), _dp(c[5], u1, x2), _dp(c[6], u0, x3), _dp(c[7], u1, x3))

    @njit(cache=True, inline="always")
    def dot4x2(w, wo0, wo1, a, ao0, ao1, ao2, ao3, nblk):
        z = zero_i32x16()
        c = (z, z, z, z, z, z, z, z)
        for b in range(0, nblk - 1, 2):
            for p in range(planes):
                c = _mac4x2(c, _pair(w, wo0, b, p), _pair(w, wo1, b, p), _x_pair(a, ao0, b, p),
                            _x_pair(a, ao1, b, p), _x_pair(a, ao2, b, p), _x_pair(a, ao3, b, p))
        if nblk % 2 == 1:
            b = nblk - 1
            for p in range(planes):
                c = _mac4x2(c, _tail(w, wo0, b, p), _tail(w, wo1, b, p), _x_tail(a, ao0, b, p),
                            _x_tail(a, ao1, b, p), _x_tail(a, ao2, b, p), _x_tail(a, ao3, b, p))
        return (hsum_i32x16(c[0]), hsum_i32x16(c[1]), hsum_i32x16(c[2]), hsum_i32x16(c[3]),
                hsum_i32x16(c[4]), hsum_i32x16(c[5]), hsum_i32x16(c[6]), hsum_i32x16(c[7]))

    pin_kernels(f"isa.avx512vnni.{bits}", _pair, _tail, _x_pair, _x_tail, _dp, _mac4x2)
    return pin_kernels(f"isa.avx512vnni.{bits}", dot1x1, dot1x4, dot4x2), 128 if w8 else 0
