"""AMX int8 GEMM engine: ``tdpbssd`` on 16x64-byte tiles, for products with many activation rows.

A Sapphire Rapids core multiplies a 16x64 s8 tile by a 64x16 s8 tile into 16x16 s32 in one
``tdpbssd`` (16,384 MACs, throughput one per 16 cycles: 1,024 MAC/cycle, 16x a ``vpdpbusd
zmm``). Once M is large enough to fill tiles it beats the ``vpdpbusd`` loops on codes, so on the
``avx512amx`` path ``dispatch`` routes products with one group and at least ``amx_min_m`` rows and
``amx_min_macs`` MACs here (``routing.DispatchSettings``): ``quant.qlinear``, ``matmul.gemm`` and the
NCHW conv route. Behind their separate quantize, pad and dequantize passes it lost to the fused ``vpdpbusd``
linear and to the implicit-GEMM convs, so lowered linears and channels-last convs run their own fused tile
kernels instead (``linear_amx``, ``conv_amx``), on this module's tiles and weight layout.

Layout. Activations are the same signed bytes ``a8 = a - shift`` the other paths use, in a
``(mp, kp)`` buffer with ``mp`` a multiple of ``BLOCK`` and ``kp`` = K rounded up to 64; pad
rows and columns may hold anything, because the weights' pad is zero and pad rows are never
written out.
Weights are the *signed* codes, unpacked once per ``PackedWeight`` into the tile order
``tdpbssd`` reads (``[n/16][k/64][k%64/4][n%16][k%4]``, zero-padded) and cached: N*K bytes
next to the packed copy. Then ``out = a8 @ w.T + shift * row_sums`` exactly (s32 lanes,
``k_pad <= 65536``).

Blocking. Tiles 0-3 accumulate a 32x32 output block, 4-5 hold two activation tiles, 6-7
two weight tiles: 4 ``tdpbssd`` per 4 tile loads. Each parallel task owns a rectangle of
blocks, split along whichever of M and N has more blocks (``task_grid``), and configures
and releases the tiles once, so tasks are few (4 per thread) and large.

Linux hands out AMX state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, see
``simd.amx_permitted``); without it the first tile instruction is SIGILL, so the path is
offered only after the request succeeded.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from bitmix.kernels import simd
from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.scratch import aligned_copy

BLOCK = 32  # output rows and columns per 2x2 tile block
TILE_K = 64  # bytes (int8 codes) per tile row
AMX_MACS_PER_S = 5e11  # one core, rounded down from 3136x64x576 in 0.087 ms on 2 cores (6.6e11 each)

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_PTR = _I8.as_pointer()


def _void_call(builder, name: str, argtys: list, args: list) -> None:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtys), name)
    builder.call(fn, args)


def _byte_ptr(context, builder, aryty, ary, idx, idxty):
    """Address of element ``idx`` of a 1-D or C-contiguous array, as ``i8*``."""
    a = context.make_array(aryty)(context, builder, value=ary)
    pos = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(a.data, [pos]), _PTR)


@intrinsic
def tile_config(typingctx, cfg):
    """``ldtilecfg`` from a 64-byte uint8 array (``tile_palette``)."""
    if not isinstance(cfg, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0), types.int64)
        _void_call(builder, "llvm.x86.ldtilecfg", [_PTR], [ptr])
        return context.get_dummy_value()

    return types.none(cfg), codegen


@intrinsic
def tile_release(typingctx):
    """``tilerelease``: drop the tile state so context switches stay cheap."""

    def codegen(context, builder, sig, args):
        _void_call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.none(), codegen


def _make_tile_io(tile: int, name: str):
    @intrinsic
    def tile_io(typingctx, arr, idx, stride):
        """Load or store one tile at element ``idx`` of ``arr``, rows ``stride`` bytes apart."""
        if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer) and isinstance(stride, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            step = context.cast(builder, args[2], sig.args[2], types.int64)
            _void_call(builder, name, [_I8, _PTR, _I64], [ir.Constant(_I8, tile), ptr, step])
            return context.get_dummy_value()

        return types.none(arr, idx, stride), codegen

    return tile_io


def _make_tile_zero(tile: int):
    @intrinsic
    def tile_zero(typingctx):
        """``tilezero``: clear one accumulator tile."""

        def codegen(context, builder, sig, args):
            _void_call(builder, "llvm.x86.tilezero", [_I8], [ir.Constant(_I8, tile)])
            return context.get_dummy_value()

        return types.none(), codegen

    return tile_zero


def _make_dot(c: int, a: int, b: int):
    @intrinsic
    def dot(typingctx):
        """``tdpbssd``: tile c += tile a (s8 rows) x tile b (s8, groups of 4 along K)."""

        def codegen(context, builder, sig, args):
            _void_call(builder, "llvm.x86.tdpbssd", [_I8, _I8, _I8], [ir.Constant(_I8, t) for t in (c, a, b)])
            return context.get_dummy_value()

        return types.none(), codegen

    return dot


load_a0, load_a1 = (_make_tile_io(t, "llvm.x86.tileloadd64") for t in (4, 5))
load_b0, load_b1 = (_make_tile_io(t, "llvm.x86.tileloadd64") for t in (6, 7))
store_c00, store_c01, store_c10, store_c11 = (_make_tile_io(t, "llvm.x86.tilestored64") for t in range(4))
zero_c00, zero_c01, zero_c10, zero_c11 = (_make_tile_zero(t) for t in range(4))
dot00, dot01, dot10, dot11 = _make_dot(0, 4, 6), _make_dot(1, 4, 7), _make_dot(2, 5, 6), _make_dot(3, 5, 7)
for _name, _obj in list(globals().items()):
    if _name.startswith(("load_", "store_", "zero_", "dot", "tile_")) and hasattr(_obj, "_set_uuid"):
        simd.pin_uuid(_obj, f"amx.{_name}")


@functools.cache
def tile_palette() -> np.ndarray:
    """The 64-byte ``ldtilecfg`` operand: palette 1, all 8 tiles 16 rows x 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = TILE_K
        cfg[48 + t] = 16
    return cfg


def padded_k(k: int) -> int:
    """Row length of the activation buffer the engine reads: K in whole 64-byte tile rows.

    From K, not the packed ``k_pad`` (a multiple of 128 for int2): a 1x1 conv with K=64
    would otherwise do twice the work and lose the zero-copy activation path.
    """
    return -(-k // TILE_K) * TILE_K


_TILES: weakref.WeakKeyDictionary[PackedWeight, dict] = weakref.WeakKeyDictionary()


def weight_tiles(w: PackedWeight, taps: tuple[int, int, int] | None = None) -> np.ndarray:
    """Signed weight codes in ``tdpbssd`` tile order, built once per ``PackedWeight`` (module docstring).

    ``taps = (c, kh, kw)`` reorders a conv weight's K from ``(c, kh, kw)`` (how it is packed,
    like ``weight.reshape(C_out, -1)``) to ``(kh, kw, c)``, the order of channels-last im2col.
    """
    per_weight = _TILES.setdefault(w, {})
    tiles = per_weight.get(taps)
    if tiles is None:
        n_pad = -(-w.n // BLOCK) * BLOCK
        kp = padded_k(w.k)
        codes = unpack_weights(w)
        if taps is not None:
            codes = codes.reshape(w.n, *taps).transpose(0, 2, 3, 1).reshape(w.n, w.k)
        padded = np.zeros((n_pad, kp), dtype=np.int8)
        padded[: w.n, : w.k] = codes
        tiles = aligned_copy(padded.reshape(n_pad // 16, 16, kp // TILE_K, 16, 4).transpose(0, 2, 3, 1, 4))
        tiles = tiles.reshape(-1)  # tile rows on cache lines (``scratch``)
        per_weight[taps] = tiles
    return tiles


def task_grid(m: int, n: int, tasks: int) -> tuple[int, int, bool]:
    """(row blocks, column blocks) per task and the loop order inside a task.

    The larger operand is split across ``tasks``; inside a task the loop keeps the split
    operand's block fixed while it sweeps the other (rows outer when rows were split). On
    the 1x1 conv 3136x256x64, sweeping columns inside (32 KB of output rows written
    contiguously) measured 0.05 ms against 0.30 ms the other way round.
    """
    mb = -(-m // BLOCK)
    nb = -(-n // BLOCK)
    split_rows = mb >= nb or nb == 1
    if split_rows:
        tm = min(mb, tasks)
        tn = min(nb, max(1, -(-tasks // tm)))
    else:
        tn = min(nb, tasks)
        tm = min(mb, max(1, -(-tasks // tn)))
    return -(-mb // tm), -(-nb // tn), split_rows


def _core(a8, kp, tiles, m, n, wsum, shift, cfg, m_step, n_step, rows_outer, out, nchw, scale, bias, has_bias, hw,
          y):
    """``acc (m, n) = a8 @ tiles.T + shift * wsum``; tasks of ``m_step x n_step`` blocks.

    Writes ``out`` (int32, flat (m, n)), or with ``nchw`` the dequantized conv output
    ``y[b, j, p] = float32(acc[b * hw + p, j]) * scale[j] (+ bias[j])`` straight from the tiles,
    which saves writing and re-reading the int32 accumulators.
    """
    nkb = kp // TILE_K
    mblocks = (m + BLOCK - 1) // BLOCK
    nblocks = (n + BLOCK - 1) // BLOCK
    tm = (mblocks + m_step - 1) // m_step
    tn = (nblocks + n_step - 1) // n_step
    row_bytes = n * 4
    panel = nkb * 1024  # bytes of one 16-column weight panel
    for t in prange(tm * tn):
        tile_config(cfg)
        scratch = np.empty(BLOCK * BLOCK, dtype=np.int32)
        tni = t // tm
        tmi = t - tni * tm
        m0 = tmi * m_step
        n0 = tni * n_step
        cm = min(mblocks, m0 + m_step) - m0
        cn = min(nblocks, n0 + n_step) - n0
        for q in range(cm * cn):
            if rows_outer:
                mb = m0 + q // cn
                nb = n0 + q % cn
            else:
                nb = n0 + q // cm
                mb = m0 + q % cm
            j0 = nb * BLOCK
            b0 = 2 * nb * panel
            i0 = mb * BLOCK
            zero_c00()
            zero_c01()
            zero_c10()
            zero_c11()
            for kb in range(nkb):
                load_a0(a8, i0 * kp + kb * TILE_K, kp)
                load_a1(a8, (i0 + 16) * kp + kb * TILE_K, kp)
                load_b0(tiles, b0 + kb * 1024, TILE_K)
                load_b1(tiles, b0 + panel + kb * 1024, TILE_K)
                dot00()
                dot01()
                dot10()
                dot11()
            if nchw:
                store_c00(scratch, 0, BLOCK * 4)
                store_c01(scratch, 16, BLOCK * 4)
                store_c10(scratch, 16 * BLOCK, BLOCK * 4)
                store_c11(scratch, 16 * BLOCK + 16, BLOCK * 4)
                rows = min(m, i0 + BLOCK) - i0
                for jj in range(min(n, j0 + BLOCK) - j0):
                    j = j0 + jj
                    s = scale[j]
                    add = bias[j] if has_bias else np.float32(0)
                    corr = shift * wsum[j]
                    r0 = 0
                    while r0 < rows:  # one contiguous run of pixels per image the block covers
                        b = (i0 + r0) // hw
                        p0 = i0 + r0 - b * hw
                        r1 = min(rows, r0 + hw - p0)
                        dst = y[b, j]
                        for r in range(r0, r1):
                            v = np.float32(scratch[np.uintp(r * BLOCK + jj)] + corr) * s
                            if has_bias:
                                v = v + add
                            dst[np.uintp(p0 + r - r0)] = v
                        r0 = r1
            elif i0 + BLOCK <= m and j0 + BLOCK <= n:
                base = i0 * n + j0
                store_c00(out, base, row_bytes)
                store_c01(out, base + 16, row_bytes)
                store_c10(out, base + 16 * n, row_bytes)
                store_c11(out, base + 16 * n + 16, row_bytes)
                if shift != 0:
                    for i in range(i0, i0 + BLOCK):
                        for j in range(j0, j0 + BLOCK):
                            out[i * n + j] += shift * wsum[j]
            else:
                store_c00(scratch, 0, BLOCK * 4)
                store_c01(scratch, 16, BLOCK * 4)
                store_c10(scratch, 16 * BLOCK, BLOCK * 4)
                store_c11(scratch, 16 * BLOCK + 16, BLOCK * 4)
                for i in range(i0, min(m, i0 + BLOCK)):
                    for j in range(j0, min(n, j0 + BLOCK)):
                        out[i * n + j] = scratch[(i - i0) * BLOCK + j - j0] + shift * wsum[j]
        tile_release()


@functools.cache
def driver(parallel: bool):
    """The engine, compiled with ``prange`` or as a plain loop (one task)."""
    d = njit(parallel=parallel, cache=True)(simd.cache_variant(_core, "parallel" if parallel else "serial"))
    return simd.pin_uuid(d, "amx.core" + ("" if parallel else ".serial"))
