"""The tiled GEMM/GEMV driver: int32 ``a (M, K) @ w (N, K).T`` for 2/4/8-bit codes on one ISA's micro-kernels.

Activations of any width are first turned into signed bytes ``a8 = a - shift`` (shift is
128 for unsigned 8-bit, else 0), zero-padded to the weight block, with row sums
``asum``. The micro-kernels (``isa``) compute ``dot(u, a8)`` on the stored unsigned weights
``u = w + offset`` and the driver returns the exact result

    ``acc = dot(u, a8) - offset * asum[m] + shift * row_sums[n]``.

One driver is generated per (ISA, weight bits, serial or parallel) by ``core_for``. Work is
split into (group, weight-row tile, activation-row tile) tiles, run with ``prange`` on that
single outer loop. Inside a tile, M < 4 uses the 1x4 micro-kernel (one activation row against
four weight rows, GEMV) and larger M the 4x2 one, so each weight block is unpacked once for four
activation rows. ``k_pad`` is limited to ``limits.MAX_K_PAD`` = 65536 so every s32 lane fits
(65536 * 255 * 128 < 2^31).
"""

from __future__ import annotations

import functools

from numba import njit, prange

from bitmix.kernels import simd
from bitmix.kernels.isa import micro_kernels
from bitmix.kernels.pack import codes_per_block

MR = 4  # activation rows per GEMM micro-tile
MT = 64  # activation rows per parallel tile (multiple of MR)
NT = 32  # weight rows per parallel tile
PF_BYTES = 16384  # GEMV: software-prefetch weights this far ahead (cold 4096^2: best of 4-32 rows, int4 and int2)


dot1x1 = dot1x4 = dot4x2 = None  # the micro-kernels ``core`` calls, bound per driver (``simd.cache_variant``)


@functools.cache
def core_for(bits: int, isa: str, parallel: bool = True):
    """The GEMM driver for one (micro-kernel set, weight bits): ``prange`` over tiles, or the same loop serially."""
    kernels, wcorr = micro_kernels(isa, bits)
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

    variant = f"{isa}_w{bits}_{'parallel' if parallel else 'serial'}"
    bound = simd.cache_variant(core, variant, **dict(zip(("dot1x1", "dot1x4", "dot4x2"), kernels, strict=True)))
    return simd.pin_uuid(njit(parallel=parallel, cache=True)(bound), f"tiling.{variant}.core")
