"""Stride-1 convs on the AMX tile engine: ``conv_nhwc``'s implicit-GEMM interface, on the padded codes (issue 15).

In the padded NHWC code buffer (``hp x wp`` pixels of ``c4`` bytes per image), output pixel ``(oh, ow)`` of a
stride-1 conv reads tap ``(i, j)`` at padded pixel ``(oh + i * dh, ow + j * dw)``. Numbered over the padded width
(virtual row ``(b * hp + oh) * wp + ow``), every tap is one constant offset from the virtual row, so 16
consecutive virtual rows at one tap are 16 buffer rows ``c4`` bytes apart: a tile, read in place, when ``c4`` is
a multiple of 64 (whole tile rows). Virtual rows with ``oh >= ho`` or ``ow >= wo`` are computed and dropped
(7 % more work at 56x56 with a 3x3, 65 % at 7x7; a 1x1 without padding has none). No im2col, no per-pixel sums:
signed codes against signed weights, ``acc = a8 . w + shift * row_sums``. Each 32 x 32 output block leaves
through ``gemm_vnni``'s epilogue intrinsics -- ``float32(acc) * scale (+ bias) (+ residual)``, clamped, into the
NHWC output, or quantized into the next conv's padded codes -- so outputs are bit-identical to the vpdpbusd
route's. A row block whose taps would read past the buffer is copied, zero-padded, into a task buffer first.
Strided convs and channel counts that are not a multiple of 64 stay on the vpdpbusd implicit GEMM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from bitmix.kernels import amx, gemm_vnni, simd
from bitmix.kernels.amx import (
    BLOCK,
    TILE_K,
    dot00,
    dot01,
    dot10,
    dot11,
    load_a0,
    load_a1,
    load_b0,
    load_b1,
    store_c00,
    store_c01,
    store_c10,
    store_c11,
    tile_config,
    tile_release,
    zero_c00,
    zero_c01,
    zero_c10,
    zero_c11,
)
from bitmix.kernels.broadcast import first_pixel, next_pixel
from bitmix.kernels.gemm_vnni import load_f32_bits, store_codes, store_codes_of, store_epilogue
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.simd import add_i32x16, load_i32x16
from bitmix.kernels.threads import thread_count

NO_CODES = (np.zeros(gemm_vnni.LANES, dtype=np.int8), np.zeros(5, dtype=np.int64), np.ones(4, dtype=np.float32),
            gemm_vnni.NO_I32)  # out8, cgeo, q8, nan


def takes(w: PackedWeight, c: int, geom: tuple[int, ...]) -> bool:
    """Whether this engine takes a conv: one group, stride 1, ``c`` input channels a multiple of 64."""
    kh, kw, sh, sw, _, _, _, _, groups, _, _ = geom
    return sh == sw == groups == 1 and c % TILE_K == 0 and w.k == c * kh * kw


def _core(a8, c4, tapoff, vgeo, kp, tiles, n, cw, cfg, m_step, n_step, rows_outer, mode, scale, bias, res, lo, hi,
          out, codes, out8, cgeo, q8, nan):
    """Over virtual rows ``v < vgeo[0]`` (``(b * hp + oh) * wp + ow``; ``vgeo`` = (rows, hp, wp, ho, wo)):
    ``acc = sum over taps t of a8 rows v + tapoff[t] (c4 bytes each) . tiles + cw``, each valid row of each
    32 x 32 block stored as ``store_epilogue`` floats at output pixel ``p = (b * ho + oh) * wo + ow`` of ``out``
    ((m, n) NHWC; ``mode`` ROWS: times ``res[p]``) or, with ``codes``, as ``store_codes`` codes at pixel
    ``(b, oh + ph, ow + pw)`` of the next conv's padded buffer ``out8`` (``cgeo`` = its (Hp, Wp, ph, pw, c4);
    ``q8`` its (step, lo, hi, shift)); with ``codes`` and ``mode`` FLOATS, both (``gemm_vnni.put_both``; ``nan[0]``
    set on a NaN float). A plain GEMM (``linear_amx``) is one tap over ``(rows, rows, 1, rows, 1)``."""
    mv, hp, wp, ho, wo = vgeo[0], vgeo[1], vgeo[2], vgeo[3], vgeo[4]
    chunks = c4 // TILE_K  # K steps per tap
    ntaps = tapoff.shape[0]
    reach = tapoff[ntaps - 1]  # the farthest tap, in pixels
    size = a8.shape[0]
    mblocks = (mv + BLOCK - 1) // BLOCK
    nblocks = (n + BLOCK - 1) // BLOCK
    tm = (mblocks + m_step - 1) // m_step
    tn = (nblocks + n_step - 1) // n_step
    panel = (kp // TILE_K) * 1024  # bytes of one 16-column weight panel
    hq, wq, qph, qpw, c4n = cgeo[0], cgeo[1], cgeo[2], cgeo[3], cgeo[4]
    step, qlo, qhi, qshift = q8[0], q8[1], q8[2], q8[3]
    for t in prange(tm * tn):
        tile_config(cfg)
        acc = np.empty(BLOCK * BLOCK, dtype=np.int32)
        pix = np.empty(BLOCK, dtype=np.int64)  # each row's output pixel, -1: none
        dst = np.empty(BLOCK, dtype=np.int64)  # ... its first element in ``out`` (or ``out8``)
        tni = t // tm
        tmi = t - tni * tm
        m0 = tmi * m_step
        n0 = tni * n_step
        cm = min(mblocks, m0 + m_step) - m0
        cn = min(nblocks, n0 + n_step) - n0
        last = (m0 + cm) * BLOCK + reach > size // c4  # this task's last block would read past the codes
        tail = np.zeros((BLOCK + reach) * c4 if last else 0, dtype=np.int8)
        tail_block = -1
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
            src = a8
            base = i0 * c4
            if (i0 + BLOCK + reach) * c4 > size:
                if tail_block != mb:
                    tail[: size - base] = a8[base:]
                    tail_block = mb
                src = tail
                base = 0
            zero_c00()
            zero_c01()
            zero_c10()
            zero_c11()
            for tap in range(ntaps):
                at = base + tapoff[tap] * c4
                for ch in range(chunks):
                    kb = tap * chunks + ch
                    load_a0(src, at + ch * TILE_K, c4)
                    load_a1(src, at + 16 * c4 + ch * TILE_K, c4)
                    load_b0(tiles, b0 + kb * 1024, TILE_K)
                    load_b1(tiles, b0 + panel + kb * 1024, TILE_K)
                    dot00()
                    dot01()
                    dot10()
                    dot11()
            store_c00(acc, 0, BLOCK * 4)
            store_c01(acc, 16, BLOCK * 4)
            store_c10(acc, 16 * BLOCK, BLOCK * 4)
            store_c11(acc, 16 * BLOCK + 16, BLOCK * 4)
            rows = min(mv, i0 + BLOCK) - i0
            b, oh, ow = first_pixel(i0, hp * wp, wp)  # the block's first virtual row, then walked
            for r in range(rows):
                pix[r] = -1 if oh >= ho or ow >= wo else (b * ho + oh) * wo + ow
                dst[r] = ((b * hq + oh + qph) * wq + ow + qpw) * c4n if codes else pix[r] * n
                b, oh, ow = next_pixel(b, oh, ow, hp, wp)
            for half in range(2):
                col = j0 + 16 * half
                if col >= n:
                    break
                count = min(16, n - col)
                c = load_i32x16(cw, col)
                sv = load_f32_bits(scale, col, count)
                bv = load_f32_bits(bias, col, count)
                for r in range(rows):
                    p = pix[r]
                    if p < 0:
                        continue
                    s = add_i32x16(load_i32x16(acc, r * BLOCK + 16 * half), c)
                    if codes and mode & gemm_vnni.FLOATS:
                        store_epilogue(out, p * n + col, s, sv, bv, res, mode, lo, hi, np.float32(1), count)
                        store_codes_of(out8, dst[r] + col, out, p * n + col, step, qlo, qhi, qshift, count, nan)
                    elif codes:
                        store_codes(out8, dst[r] + col, s, sv, bv, mode, lo, hi, step, qlo, qhi, qshift, count)
                    else:
                        row_scale = res[p] if mode & gemm_vnni.ROWS else np.float32(1)
                        store_epilogue(out, dst[r] + col, s, sv, bv, res, mode, lo, hi, row_scale, count)
        tile_release()


@functools.cache
def driver():
    return simd.pin_uuid(njit(parallel=True, cache=True)(_core), "conv_amx.core")


def _launch(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
            parallel: bool) -> tuple:
    """The constant leading arguments of ``_core`` after ``a8`` for one conv shape (``m`` output pixels)."""
    kh, kw, _, _, _, _, dh, dw, _, ho, wo = geom
    nb = m // (ho * wo)
    rows = ((nb - 1) * hp + ho - 1) * wpad + wo  # virtual rows up to the last output pixel
    tapoff = np.array([i * dh * wpad + j * dw for i in range(kh) for j in range(kw)], dtype=np.int64)
    vgeo = np.array((rows, hp, wpad, ho, wo), dtype=np.int64)
    n_pad = -(-w.n // BLOCK) * BLOCK
    cw = np.zeros(n_pad, dtype=np.int32)  # whole 16-lane loads past n read zeros
    cw[: w.n] = shift * w.row_sums
    m_step, n_step, rows_outer = amx.task_grid(rows, w.n, 4 * thread_count() if parallel else 1)
    return (c, tapoff, vgeo, amx.padded_k(w.k), amx.weight_tiles(w, (c, kh, kw)), w.n, cw, amx.tile_palette(),
            m_step, n_step, rows_outer)


def conv_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
              scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple,
              parallel: bool, a_max: int = 128
              ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], None]:
    """``gemm_vnni.conv_gemm`` for a conv this engine ``takes``: ``run(a8, psum, y, res)`` (``psum`` unused)."""
    head = _launch(w, shift, c, geom, hp, wpad, m, parallel)
    mode = (gemm_vnni.SCALED if bias is None else gemm_vnni.SCALED_BIASED) | (gemm_vnni.RESIDUAL if residual else 0)
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])
    bias_arg = scale if bias is None else bias
    core = driver()

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None) -> None:
        args = (a8, *head, mode, scale, bias_arg, gemm_vnni.NO_F32 if res is None else res.reshape(-1), lo, hi,
                y.reshape(-1), False, *NO_CODES)
        if parallel:
            core(*args)
            return
        with gemm_vnni.threads_if(False):
            core(*args)

    return run


def conv_codes_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
                    scale: np.ndarray, bias: np.ndarray | None, clamp: tuple, parallel: bool, nxt_padded: tuple,
                    nxt_pad: tuple[int, int], nxt_quant: tuple,
                    a_max: int = 128) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``gemm_vnni.conv_codes_gemm`` for a conv this engine ``takes``: ``run(a8, psum, out8)`` writes the next
    conv's padded codes (``psum`` unused)."""
    both = conv_both_gemm(w, shift, c, geom, hp, wpad, m, scale, bias, False, clamp, parallel, nxt_padded, nxt_pad,
                          nxt_quant, floats=False)

    def run(a8: np.ndarray, psum: np.ndarray, out8: np.ndarray) -> None:
        both(a8, psum, gemm_vnni.NO_F32, None, out8, gemm_vnni.NO_I32)

    return run


def conv_both_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
                   scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple, parallel: bool,
                   nxt_padded: tuple, nxt_pad: tuple[int, int], nxt_quant: tuple, a_max: int = 128,
                   floats: bool = True) -> Callable[..., None]:
    """``gemm_vnni.conv_both_gemm`` for a conv this engine ``takes``: ``run(a8, psum, y, res, out8, nan)``
    (``psum`` unused); without ``floats``, codes alone (``y`` and ``res`` unused)."""
    head = _launch(w, shift, c, geom, hp, wpad, m, parallel)
    mode = (gemm_vnni.CODES | (gemm_vnni.FLOATS | gemm_vnni.SCALED if floats else 0)
            | (0 if bias is None else gemm_vnni.BIAS) | (gemm_vnni.RESIDUAL if residual else 0))
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])
    cgeo = np.array((nxt_padded[1], nxt_padded[2], nxt_pad[0], nxt_pad[1], nxt_padded[3]), dtype=np.int64)
    q8 = np.array(nxt_quant, dtype=np.float32)
    sb = (mode, scale, scale if bias is None else bias)
    core = driver()

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None, out8: np.ndarray,
            nan: np.ndarray) -> None:
        args = (a8, *head, *sb, gemm_vnni.NO_F32 if res is None else res.reshape(-1), lo, hi, y.reshape(-1), True,
                out8, cgeo, q8, nan)
        if parallel:
            core(*args)
            return
        with gemm_vnni.threads_if(False):
            core(*args)

    return run
