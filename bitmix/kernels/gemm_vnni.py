"""Register-blocked AVX-512 VNNI GEMM for products with 4 or more activation rows (issue 15).

The dot-product micro-kernels of ``isa.avx512vnni`` keep one accumulator per (row, output)
pair and end every K loop with horizontal sums; on a conv GEMM (thousands of rows, K of a few
hundred) those sums and the per-row 32-byte gathers cost about as much as the ``vpdpbusd``s.
Here, as in MLAS's and oneDNN's int8 kernels, the weights are re-laid once per layer as
``[n/16][k/4][16][4]`` bytes (16 output channels x 4 K codes = one zmm), the four activation
bytes of a K step are broadcast, and a 4-row x 64-channel tile accumulates in 16 zmm
registers with no reduction at all. The weights are stored unpacked (one byte per code, the
stored ``u = code + offset`` for 2/4-bit, the signed code for 8-bit), so the layer's packed
weight keeps its 2/4-bit form for the GEMV path and this copy costs one byte per weight.

The exact result is the driver's (``tiling``): ``dot(u, a8) - offset * asum + (shift - wcorr) * row_sums``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.simd import (
    add_i32x16,
    bcast4_i8x64,
    dpbusd512,
    flip_sign_i8x64,
    load_i8x64,
    load_i32x16,
    splat_i32x16,
    store_i32x16,
    zero_i32x16,
)

LANES = 16  # output channels per zmm
MIN_M = 4  # fewer rows: the GEMV micro-kernels (one weight pass per row) are the right shape
MT = 64  # activation rows per parallel task


@dataclass(frozen=True, eq=False)
class ChannelBlocks:
    """A packed weight re-laid for the broadcast kernel: ``data`` = ``[n_pad/16][k_pad/4][16][4]`` bytes."""

    data: np.ndarray
    n_pad: int
    row_sums: np.ndarray  # int32 (n_pad,), zero past n


_BLOCKS: weakref.WeakKeyDictionary[PackedWeight, ChannelBlocks] = weakref.WeakKeyDictionary()


def channel_blocks(w: PackedWeight) -> ChannelBlocks:
    """``w`` in the broadcast kernel's layout, built once per packed weight (at its first large product)."""
    blocks = _BLOCKS.get(w)
    if blocks is None:
        codes = unpack_weights(w).astype(np.int16) + w.offset
        n_pad = -(-w.n // LANES) * LANES
        full = np.zeros((n_pad, w.k_pad), dtype=np.uint8)
        full[: w.n, : w.k] = codes.astype(np.int8).view(np.uint8) if w.bits == 8 else codes.astype(np.uint8)
        data = full.reshape(n_pad // LANES, LANES, w.k_pad // 4, 4).transpose(0, 2, 1, 3).reshape(-1)
        sums = np.zeros(n_pad, dtype=np.int32)
        sums[: w.n] = w.row_sums
        blocks = _BLOCKS[w] = ChannelBlocks(np.ascontiguousarray(data), n_pad, sums)
    return blocks


@functools.cache
def driver(w8: bool, parallel: bool):
    """The GEMM over (row tile, 64-channel tile) tasks; ``w8``: signed 8-bit weights (activations
    become the unsigned operand, as in ``isa.avx512vnni``)."""

    @njit(inline="always")
    def dp(acc, wv, av):
        if w8:
            return dpbusd512(acc, flip_sign_i8x64(av), wv)
        return dpbusd512(acc, wv, av)

    @njit(inline="always")
    def put(out, tmp, row, col, n, v):
        if col + LANES <= n:
            store_i32x16(out, row * n + col, v)
        else:
            store_i32x16(tmp, 0, v)
            for q in range(n - col):
                out[row * n + col + q] = tmp[q]

    @njit(inline="always")
    def finish(out, tmp, cw, asum, offset, i, rows, col, n, v0, v1, v2, v3):
        c = load_i32x16(cw, col)
        put(out, tmp, i, col, n, add_i32x16(add_i32x16(v0, c), splat_i32x16(-offset * asum[i])))
        if rows > 1:
            put(out, tmp, i + 1, col, n, add_i32x16(add_i32x16(v1, c), splat_i32x16(-offset * asum[i + 1])))
        if rows > 2:
            put(out, tmp, i + 2, col, n, add_i32x16(add_i32x16(v2, c), splat_i32x16(-offset * asum[i + 2])))
        if rows > 3:
            put(out, tmp, i + 3, col, n, add_i32x16(add_i32x16(v3, c), splat_i32x16(-offset * asum[i + 3])))

    def core(a8, asum, wp, cw, offset, m, n, n_pad, kp, out):
        kq4 = kp // 4
        ws = kq4 * 64  # bytes per 16-channel block
        nblk = n_pad // LANES
        ntiles = (nblk + 3) // 4
        mtiles = (m + MT - 1) // MT
        for t in prange(ntiles * mtiles):
            nt = t // mtiles
            mt = t - nt * mtiles
            b0 = nt * 4
            b1 = min(nblk, b0 + 4)
            tmp = np.empty(LANES, dtype=np.int32)
            for i in range(mt * MT, min(m, mt * MT + MT), 4):
                rows = min(4, m - i)
                a0 = i * kp
                if b1 - b0 == 4:
                    z = zero_i32x16()
                    c00, c01, c02, c03, c10, c11, c12, c13 = z, z, z, z, z, z, z, z
                    c20, c21, c22, c23, c30, c31, c32, c33 = z, z, z, z, z, z, z, z
                    wb = b0 * ws
                    for q in range(kq4):
                        wo = wb + q * 64
                        w0 = load_i8x64(wp, wo)
                        w1 = load_i8x64(wp, wo + ws)
                        w2 = load_i8x64(wp, wo + 2 * ws)
                        w3 = load_i8x64(wp, wo + 3 * ws)
                        x = bcast4_i8x64(a8, a0 + 4 * q)
                        c00, c01, c02, c03 = dp(c00, w0, x), dp(c01, w1, x), dp(c02, w2, x), dp(c03, w3, x)
                        x = bcast4_i8x64(a8, a0 + kp + 4 * q)
                        c10, c11, c12, c13 = dp(c10, w0, x), dp(c11, w1, x), dp(c12, w2, x), dp(c13, w3, x)
                        x = bcast4_i8x64(a8, a0 + 2 * kp + 4 * q)
                        c20, c21, c22, c23 = dp(c20, w0, x), dp(c21, w1, x), dp(c22, w2, x), dp(c23, w3, x)
                        x = bcast4_i8x64(a8, a0 + 3 * kp + 4 * q)
                        c30, c31, c32, c33 = dp(c30, w0, x), dp(c31, w1, x), dp(c32, w2, x), dp(c33, w3, x)
                    col = b0 * LANES
                    finish(out, tmp, cw, asum, offset, i, rows, col, n, c00, c10, c20, c30)
                    finish(out, tmp, cw, asum, offset, i, rows, col + 16, n, c01, c11, c21, c31)
                    finish(out, tmp, cw, asum, offset, i, rows, col + 32, n, c02, c12, c22, c32)
                    finish(out, tmp, cw, asum, offset, i, rows, col + 48, n, c03, c13, c23, c33)
                else:
                    for b in range(b0, b1):
                        z = zero_i32x16()
                        c0, c1, c2, c3 = z, z, z, z
                        wb = b * ws
                        for q in range(kq4):
                            w0 = load_i8x64(wp, wb + q * 64)
                            c0 = dp(c0, w0, bcast4_i8x64(a8, a0 + 4 * q))
                            c1 = dp(c1, w0, bcast4_i8x64(a8, a0 + kp + 4 * q))
                            c2 = dp(c2, w0, bcast4_i8x64(a8, a0 + 2 * kp + 4 * q))
                            c3 = dp(c3, w0, bcast4_i8x64(a8, a0 + 3 * kp + 4 * q))
                        finish(out, tmp, cw, asum, offset, i, rows, b * LANES, n, c0, c1, c2, c3)

    simd.pin_kernels(f"gemm_vnni.{'w8' if w8 else 'wq'}", dp, put, finish)
    fn = njit(parallel=parallel, cache=True)(core)
    simd.pin_uuid(fn, f"gemm_vnni.core.{'w8' if w8 else 'wq'}" + ("" if parallel else ".serial"))
    return fn


def run(a8: np.ndarray, asum: np.ndarray, w: PackedWeight, shift: int, m: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` = the exact int32 product of one group (``a8`` rows of ``w.k_pad`` bytes, at least
    ``m`` rounded up to 4 rows readable)."""
    blocks = channel_blocks(w)
    wcorr = 128 if w.bits == 8 else 0
    cw = (shift - wcorr) * blocks.row_sums
    driver(w.bits == 8, parallel)(a8, asum, blocks.data, cw.astype(np.int32), w.offset, m, w.n, blocks.n_pad,
                                  w.k_pad, out.reshape(-1))
