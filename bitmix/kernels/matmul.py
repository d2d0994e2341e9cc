"""Bit-packed integer GEMM/GEMV: int32 ``a (M, K) @ w (N, K).T`` for 2/4/8-bit codes.

Activations of any width are first turned into signed bytes ``a8 = a - shift`` (shift is
128 for unsigned 8-bit, else 0), zero-padded to the weight block, with row sums
``asum``. The kernels compute ``dot(u, a8)`` on the stored unsigned weights ``u = w +
offset`` and return the exact result

    ``acc = dot(u, a8) - offset * asum[m] + shift * row_sums[n]``.

One driver is generated per (path, weight bits) by ``core_for``; paths are described in
``simd``. Work is split into (group, weight-row tile, activation-row tile) tiles, run with
``prange`` on that single outer loop. Inside a tile, M < 4 uses a 1x4 micro-kernel (one
activation row against four weight rows, GEMV) and larger M a 4x2 one, so each weight
block is unpacked once for four activation rows. Accumulators stay exact: an int16 partial
sum holds ``GROUP`` blocks, i.e. at most 8 ``vpmaddubsw`` results of u <= 15 (int4:
8 * 3840 = 30720) or 16 of u <= 3 (int2: 16 * 768), below 32767; ``k_pad`` is limited to
65536 so every s32 lane fits (65536 * 255 * 128 < 2^31).
"""

from __future__ import annotations

import functools
import time

import numba
import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels import amx, simd, threads
from bitmix.kernels.pack import BLOCK_BYTES, SUPPORTED_BITS, PackedWeight, code_range, codes_per_block
from bitmix.kernels.simd import (
    add_i16x16,
    add_i32x8,
    dpbusd512,
    flip_sign_i8x64,
    hsum_i32x8,
    hsum_i32x16,
    load_i8x32,
    load_i8x64,
    madd_ones,
    madd_s8,
    maddubs,
    prefetch,
    unpack_i8x32,
    unpack_i8x64,
    widen_i8x32,
    zero_i8x32,
    zero_i16x16,
    zero_i32x8,
    zero_i32x16,
)

ACTIVE_PATH: str = simd.select_path()
THREADING_LAYER: str = threads.configure_threading()
MAX_K_PAD = 65536
MR = 4  # activation rows per GEMM micro-tile
MT = 64  # activation rows per parallel tile (multiple of MR)
GROUP = 4  # AVX2: blocks summed in int16 before one vpmaddwd (bound in the module docstring)
NT = 32  # weight rows per parallel tile
PF_BYTES = 16384  # GEMV: software-prefetch weights this far ahead (cold 4096^2: best of 4-32 rows, int4 and int2)
SERIAL_MAX_MACS: int | None = None  # products this small run on one thread; set on first use by serial_max_macs()
SERIAL_MACS_PER_S = 6e10  # one core's int4 GEMV/GEMM rate, measured on Sapphire Rapids and Zen 3 (+-30%)


def _pin(path: str, bits: int, *funcs):
    """Stable identities for generated dispatchers, so their closures hit the disk cache."""
    for f in funcs:
        simd.pin_uuid(f, f"matmul.{path}.{bits}.{f.py_func.__name__}")
    return funcs


def _micro_portable(bits: int):
    """Scalar micro-kernels on the packed layout (any CPU)."""
    planes = 8 // bits
    mask = (1 << bits) - 1
    cpb = codes_per_block(bits)
    signed8 = bits == 8

    @njit(cache=True)
    def dot1x1(w, wo, a, ao, nblk):
        s = 0
        for b in range(nblk):
            for j in range(BLOCK_BYTES):
                byte = np.int64(w[wo + BLOCK_BYTES * b + j])
                if signed8:
                    s += (byte - ((byte >> 7) << 8)) * np.int64(a[ao + cpb * b + j])
                else:
                    for p in range(planes):
                        s += ((byte >> (bits * p)) & mask) * np.int64(a[ao + cpb * b + BLOCK_BYTES * p + j])
        return s

    @njit(cache=True)
    def dot1x4(w, wo0, wo1, wo2, wo3, a, ao, nblk, pf):
        return (
            dot1x1(w, wo0, a, ao, nblk),
            dot1x1(w, wo1, a, ao, nblk),
            dot1x1(w, wo2, a, ao, nblk),
            dot1x1(w, wo3, a, ao, nblk),
        )

    @njit(cache=True)
    def dot4x2(w, wo0, wo1, a, ao0, ao1, ao2, ao3, nblk):
        return (
            dot1x1(w, wo0, a, ao0, nblk),
            dot1x1(w, wo1, a, ao0, nblk),
            dot1x1(w, wo0, a, ao1, nblk),
            dot1x1(w, wo1, a, ao1, nblk),
            dot1x1(w, wo0, a, ao2, nblk),
            dot1x1(w, wo1, a, ao2, nblk),
            dot1x1(w, wo0, a, ao3, nblk),
            dot1x1(w, wo1, a, ao3, nblk),
        )

    return _pin("portable", bits, dot1x1, dot1x4, dot4x2), 0


def _micro_avx2_w8():
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

    return _pin("avx2", 8, dot1x1, dot1x4, dot4x2), 0


def _micro_avx2(bits: int):
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

    return _pin("avx2", bits, dot1x1, dot1x4, dot4x2), 0


def _micro_avx512(bits: int):
    """AVX-512 VNNI: ``vpdpbusd zmm`` over two 32-byte blocks at a time, ymm-wide tail block.

    For 8-bit weights the activations become the unsigned operand (``a8 ^ 0x80`` = a8 + 128)
    and the weights the signed one; the extra ``128 * row_sums`` is returned as ``wcorr``.
    """
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

    _pin("avx512vnni", bits, _pair, _tail, _x_pair, _x_tail, _dp, _mac4x2)
    return _pin("avx512vnni", bits, dot1x1, dot1x4, dot4x2), 128 if w8 else 0


@functools.cache
def micro_kernels(path: str, bits: int):
    """``((dot1x1, dot1x4, dot4x2), wcorr)`` for one (path, weight bits); built once per process."""
    if path == "portable":
        return _micro_portable(bits)
    if path == "avx2":
        return _micro_avx2_w8() if bits == 8 else _micro_avx2(bits)
    return _micro_avx512(bits)  # avx512amx too: its small-M products run these


@functools.cache
def core_for(bits: int, path: str, parallel: bool = True):
    """The GEMM driver for one (path, weight bits): ``prange`` over tiles, or the same loop serially."""
    (dot1x1, dot1x4, dot4x2), wcorr = micro_kernels(path, bits)
    offset = 0 if bits == 8 else 1 << (bits - 1)
    row_bytes_per_code = bits
    cpb = codes_per_block(bits)
    tile_n = NT if parallel else 1 << 30  # serially one weight-row tile per group (also keys the disk cache)

    def core(a8, asum, w, wsum, ashift, groups, m, mp, ng, kp, out):
        wrow = kp * row_bytes_per_code // 8
        pf_rows = max(4, PF_BYTES // wrow // 4 * 4)
        nblk = kp // cpb
        corr = ashift - wcorr
        mtiles = (m + MT - 1) // MT
        ntiles = (ng + tile_n - 1) // tile_n
        per_g = mtiles * ntiles
        for t in prange(groups * per_g):
            g = t // per_g
            r = t - g * per_g
            nt = r // mtiles
            mt = r - nt * mtiles
            n0 = g * ng + nt * tile_n
            n1 = g * ng + min(ng, nt * tile_n + tile_n)
            m0 = mt * MT
            m1 = min(m, m0 + MT)
            abase = g * mp * kp
            if m < MR:
                for i in range(m0, m1):
                    ao = abase + i * kp
                    sa = offset * asum[g * mp + i]
                    n = n0
                    while n + 4 <= n1:
                        pf = (n + pf_rows) * wrow
                        r0, r1, r2, r3 = dot1x4(
                            w, n * wrow, (n + 1) * wrow, (n + 2) * wrow, (n + 3) * wrow, a8, ao, nblk, pf
                        )
                        out[i, n] = r0 - sa + corr * wsum[n]
                        out[i, n + 1] = r1 - sa + corr * wsum[n + 1]
                        out[i, n + 2] = r2 - sa + corr * wsum[n + 2]
                        out[i, n + 3] = r3 - sa + corr * wsum[n + 3]
                        n += 4
                    while n < n1:
                        out[i, n] = dot1x1(w, n * wrow, a8, ao, nblk) - sa + corr * wsum[n]
                        n += 1
            else:
                n = n0
                while n + 2 <= n1:
                    c0 = corr * wsum[n]
                    c1 = corr * wsum[n + 1]
                    for i in range(m0, m1, MR):
                        ao = abase + i * kp
                        q = dot4x2(w, n * wrow, (n + 1) * wrow, a8, ao, ao + kp, ao + 2 * kp, ao + 3 * kp, nblk)
                        for d in range(MR):
                            if i + d < m:
                                sa = offset * asum[g * mp + i + d]
                                out[i + d, n] = q[2 * d] - sa + c0
                                out[i + d, n + 1] = q[2 * d + 1] - sa + c1
                    n += 2
                if n < n1:
                    for i in range(m0, m1):
                        sa = offset * asum[g * mp + i]
                        out[i, n] = dot1x1(w, n * wrow, a8, abase + i * kp, nblk) - sa + corr * wsum[n]

    driver = njit(parallel=parallel, cache=True)(core)
    simd.pin_uuid(driver, f"matmul.{path}.{bits}.core" + ("" if parallel else ".serial"))
    return driver


@njit(parallel=True, cache=True)
def _empty_launch(x):
    for i in prange(x.shape[0]):
        x[i] += 1


def serial_max_macs() -> int:
    """Largest product worth running serially on the vpdpbusd kernels: a parallel launch saves
    half the serial time, so it pays once ``macs / (2 * SERIAL_MACS_PER_S)`` exceeds the launch
    cost, measured here once per process (see ``threads`` for what each layer costs)."""
    global SERIAL_MAX_MACS
    if SERIAL_MAX_MACS is None:
        x = np.zeros(max(2, numba.get_num_threads()))
        _empty_launch(x)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            _empty_launch(x)
            times.append(time.perf_counter() - start)
        SERIAL_MAX_MACS = max(1 << 20, int(sorted(times)[3] * 2 * SERIAL_MACS_PER_S))
    return SERIAL_MAX_MACS


def uses_amx(w: PackedWeight, m: int, groups: int) -> bool:
    """Whether a product runs on the AMX tile engine (active path, enough rows, one group)."""
    return ACTIVE_PATH == "avx512amx" and groups == 1 and m >= amx.AMX_MIN_M and m * w.n * w.k >= amx.AMX_MIN_MACS


def engine_name(w: PackedWeight, m: int, groups: int) -> str:
    """What runs a product: ``amx``, or the SIMD path's vpdpbusd/vpmaddubsw/scalar kernels."""
    if uses_amx(w, m, groups):
        return "amx"
    return "avx512vnni" if ACTIVE_PATH == "avx512amx" else ACTIVE_PATH


def activation_layout(w: PackedWeight, m: int, groups: int) -> tuple[int, int]:
    """``(mp, kp)``: padded rows and row length of the activation byte buffer the engine reads.

    The vpdpbusd kernels need pad columns zeroed (the stored weight pad is ``offset``, not
    0); the AMX engine ignores pad contents, so its buffer may be ``np.empty``.
    """
    if uses_amx(w, m, groups):
        return -(-m // amx.BLOCK) * amx.BLOCK, amx.padded_k(w.k)
    return (m if m < MR else -(-m // MR) * MR), w.k_pad


_NO_F32 = np.zeros(0, dtype=np.float32)
_NO_Y = np.zeros((0, 0, 0), dtype=np.float32)
_NO_I32 = np.zeros(0, dtype=np.int32)


def run_core(a8, asum, w: PackedWeight, shift: int, groups: int, m: int, mp: int, out: np.ndarray | None,
             taps: tuple[int, int, int] | None = None, nchw: tuple | None = None) -> None:
    """Run one prepared product (activations already shifted into ``a8``/``asum``, laid out by
    ``activation_layout``) on the active path, serially when it is too small to repay a parallel
    launch (see ``serial_max_macs``). ``taps`` = (c, kh, kw) says the AMX engine's activation
    rows are a channels-last im2col (see ``amx.weight_tiles``); ``nchw`` = (scale, bias or None,
    hw, y) makes the AMX engine write a conv's dequantized NCHW output ``y`` instead of ``out``."""
    macs = m * w.n * w.k_pad
    many = numba.get_num_threads() > 1
    if uses_amx(w, m, groups):
        parallel = many and macs > serial_max_macs() * (amx.AMX_MACS_PER_S / SERIAL_MACS_PER_S)
        kp = amx.padded_k(w.k)
        m_step, n_step, rows_outer = amx.task_grid(m, w.n, 4 * numba.get_num_threads() if parallel else 1)
        if nchw is None:
            epilogue = (False, _NO_F32, _NO_F32, False, 1, _NO_Y)
        else:
            scale, bias, hw, y = nchw
            epilogue = (True, scale, _NO_F32 if bias is None else bias, bias is not None, hw, y)
        amx.driver(parallel)(a8, kp, amx.weight_tiles(w, taps), m, w.n, w.row_sums, shift, amx.tile_palette(),
                             m_step, n_step, rows_outer, _NO_I32 if out is None else out.reshape(-1), *epilogue)
        return
    parallel = many and macs > serial_max_macs()
    core_for(w.bits, ACTIVE_PATH, parallel)(a8, asum, w.data.reshape(-1), w.row_sums, shift, groups, m, mp,
                                            w.n // groups, w.k_pad, out)


def _prep_rows_py(a, shift, kp, a8, asum, mins, maxs, write, need_sum):
    """Shift activations to signed bytes in the padded (mp, kp) buffer, with row range and (for the
    vpdpbusd kernels, ``need_sum``) row sums; the AMX engine corrects with weight sums only.

    Separate plain loops in narrow types so LLVM vectorises each. The int32 sum may wrap
    only for out-of-range input, which the min/max (kept in the input dtype, reported as
    float64 so huge uint64 values stay out of range) rejects before any kernel runs.
    """
    m, k = a.shape
    sh = np.int32(shift)
    for i in prange(m):
        row = a[i]
        lo = row[0]
        for j in range(k):
            lo = min(lo, row[j])
        hi = row[0]
        for j in range(k):
            hi = max(hi, row[j])
        if need_sum:
            s = np.int32(0)
            for j in range(k):
                s += np.int32(row[j])
            asum[i] = np.int64(s) - shift * k
        mins[i] = np.float64(lo)
        maxs[i] = np.float64(hi)
        if write:
            dst = a8[i * kp : i * kp + k]
            for j in range(k):
                dst[j] = np.int32(row[j]) - sh


@njit(cache=True)
def _flat_range(x):
    """(min, max) of a 1-D int8 array, one vectorised loop each (3136x64: 3 us vs 27 us row by row)."""
    lo = x[0]
    for v in x:
        lo = min(lo, v)
    hi = x[0]
    for v in x:
        hi = max(hi, v)
    return np.float64(lo), np.float64(hi)


# A parallel launch costs 2-150 us depending on the threading layer (see threads): small inputs are prepared serially.
PREP_SERIAL_MAX = 1 << 18
_prep_rows = njit(parallel=True, cache=True)(simd.cache_variant(_prep_rows_py, "parallel"))
_prep_rows_serial = njit(cache=True)(simd.cache_variant(_prep_rows_py, "serial"))


def check_activation_spec(a_bits: int, a_signed: bool) -> tuple[int, int, int]:
    """Validate (a_bits, a_signed); return (lo, hi, shift to signed bytes)."""
    if a_bits not in SUPPORTED_BITS:
        raise BitmixError(f"a_bits={a_bits!r}: supported widths are 2, 4 and 8")
    if not isinstance(a_signed, bool | np.bool_):
        raise BitmixError(f"a_signed={a_signed!r}: expected a bool")
    lo, hi = code_range(a_bits, bool(a_signed))
    return lo, hi, 128 if (a_bits == 8 and not a_signed) else 0


def check_packed(w: object, name: str = "w") -> PackedWeight:
    """Reject anything that is not a well-formed ``PackedWeight``."""
    if not isinstance(w, PackedWeight):
        raise BitmixError(f"{name}: expected a PackedWeight from bitmix.kernels.pack_weights, got {type(w).__name__}")
    if w.bits not in SUPPORTED_BITS or w.k_pad % codes_per_block(w.bits) or w.k_pad > MAX_K_PAD:
        raise BitmixError(f"{name}: unsupported layout (bits={w.bits}, k_pad={w.k_pad}; k_pad must be <= {MAX_K_PAD})")
    row_bytes = w.k_pad * w.bits // 8
    if (
        not isinstance(w.data, np.ndarray)
        or w.data.dtype != np.uint8
        or w.data.shape != (w.n, row_bytes)
        or not w.data.flags.c_contiguous
        or w.row_sums.shape != (w.n,)
        or w.row_sums.dtype != np.int32
    ):
        raise BitmixError(f"{name}: corrupted PackedWeight (data must be C-contiguous uint8 {(w.n, row_bytes)})")
    return w


def check_range(lo_seen: float, hi_seen: float, lo: int, hi: int, a_bits: int, a_signed: bool) -> None:
    """Raise naming ``a_codes`` when observed codes leave the declared range."""
    if lo_seen < lo or hi_seen > hi:
        kind = "signed" if a_signed else "unsigned"
        want = f"{kind} {a_bits}-bit codes must lie in [{lo}, {hi}]"
        raise BitmixError(f"a_codes: values span [{lo_seen:.0f}, {hi_seen:.0f}] but {want}")


def gemm(a_codes: np.ndarray, w: PackedWeight, a_bits: int, a_signed: bool) -> np.ndarray:
    """Exact int32 ``a_codes (M, K) @ codes(w).T`` -> (M, N)."""
    w = check_packed(w)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    if not isinstance(a_codes, np.ndarray) or a_codes.dtype.kind not in "iu":
        raise BitmixError(f"a_codes: expected an integer numpy array, got {getattr(a_codes, 'dtype', type(a_codes))}")
    if a_codes.ndim != 2 or a_codes.shape[1] != w.k or a_codes.shape[0] < 1:
        want = f"expected (M>=1, {w.k}) for weights with N={w.n}, K={w.k}"
        raise BitmixError(f"a_codes: shape {a_codes.shape} does not match; {want}")
    m = a_codes.shape[0]
    mp, kp = activation_layout(w, m, 1)
    on_amx = uses_amx(w, m, 1)
    a = np.ascontiguousarray(a_codes)
    direct = a.dtype == np.int8 and shift == 0 and w.k == kp and mp == m
    a8 = a.reshape(-1) if direct else (np.empty if on_amx else np.zeros)(mp * kp, dtype=np.int8)
    asum = np.zeros(mp, dtype=np.int64)
    if direct and on_amx:  # nothing to copy or sum: only the range check remains
        lo_seen, hi_seen = _flat_range(a8)
    else:
        mins = np.empty(m, dtype=np.float64)
        maxs = np.empty(m, dtype=np.float64)
        prep = _prep_rows_serial if m * w.k <= PREP_SERIAL_MAX else _prep_rows
        prep(a, shift, kp, a8, asum, mins, maxs, not direct, not on_amx)
        lo_seen, hi_seen = mins.min(), maxs.max()
    check_range(float(lo_seen), float(hi_seen), lo, hi, a_bits, a_signed)
    out = np.empty((m, w.n), dtype=np.int32)
    run_core(a8, asum, w, shift, 1, m, mp, out)
    return out
