"""Scalar micro-kernels on the packed layout (any CPU); the interface is in ``isa``."""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from bitmix.kernels.pack import BLOCK_BYTES, codes_per_block
from bitmix.kernels.simd import cache_variant, pin_kernels

dot1x1 = None  # the one-row kernel the wider ones call, bound per bit width (``simd.cache_variant``)


def _dot1x4(w, wo0, wo1, wo2, wo3, a, ao, nblk, pf):
    return (
        dot1x1(w, wo0, a, ao, nblk),
        dot1x1(w, wo1, a, ao, nblk),
        dot1x1(w, wo2, a, ao, nblk),
        dot1x1(w, wo3, a, ao, nblk),
    )


def _dot4x2(w, wo0, wo1, a, ao0, ao1, ao2, ao3, nblk):
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


@functools.cache
def micro_kernels(bits: int) -> tuple[tuple, int]:
    """``((dot1x1, dot1x4, dot4x2), 0)`` for ``bits``-bit weights."""
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

    callees = {"dot1x1": dot1x1}  # bound as globals, not closure cells, so the disk cache serves them
    dot1x4 = njit(cache=True)(cache_variant(_dot1x4, f"w{bits}", **callees))
    dot4x2 = njit(cache=True)(cache_variant(_dot4x2, f"w{bits}", **callees))
    return pin_kernels(f"isa.portable.{bits}", dot1x1, dot1x4, dot4x2), 0
