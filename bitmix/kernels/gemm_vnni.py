"""Register-blocked AVX-512 VNNI GEMM and implicit-GEMM conv for 4 or more activation rows (issue 15).

The dot-product micro-kernels of ``isa.avx512vnni`` keep one accumulator per (row, output)
pair and end every K loop with horizontal sums; on a conv GEMM (thousands of rows, K of a few
hundred) those sums and the per-row 32-byte gathers cost about as much as the ``vpdpbusd``s.
Here, as in MLAS's and oneDNN's int8 kernels, the weights are re-laid once per layer as
``[n/16][k/4][16][4]`` bytes (16 output channels x 4 K codes = one zmm), the four activation
bytes of a K step are broadcast, and a 4-row x 64-channel tile accumulates in 16 zmm
registers with no reduction at all. The weights are stored unpacked, one unsigned byte per
code, ``u = code + offset`` (the packed layout's offset for 2/4-bit, 128 for 8-bit), so the
broadcast activations are always vpdpbusd's signed operand and every width runs one loop body
(with 8-bit activations as the unsigned operand instead, LLVM 22's instruction selection on the
broadcast did not finish in 10 minutes). This copy costs one byte per weight.

Convolutions run as an implicit GEMM, as oneDNN's direct int8 convs do: K is ordered
``(kh, kw, c4)`` (``c4`` = C rounded up to 4, weight bytes past C are 0) and the activation
row of output pixel ``p`` at tap ``t`` is read straight from a zero-padded NHWC code buffer at
``pixel(p) * c4 + tap_offset[t]``, so no im2col copy exists. A plain GEMM is the one-tap case
(``pixel(i) = i``, rows ``k_pad`` bytes apart). The exact result is
``dot(u, a8) - offset * asum + shift * row_sums``, ``asum`` of a row being the sum of its taps'
pixel sums; every s32 lane stays below 2^31 because ``k_pad <= limits.MAX_K_PAD``
(65536 * 255 * 128 < 2^31). The epilogue either stores that int32 or the dequantized float
``float32(acc) * scale + bias`` (``quant``'s formula) straight into the NHWC output.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from bitmix.kernels import simd
from bitmix.kernels.broadcast import (
    GEMM_GEO,
    ONE_TAP,
    conv_launch,
    first_pixel,
    four_dests,
    four_pixels,
    weight_blocks,
)
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.simd import (
    add_i32x16,
    bcast4_i8x64,
    dpbusd512,
    i32x16,
    load_i8x64,
    load_i32x16,
    splat_i32x16,
    zero_i32x16,
)
from bitmix.kernels.threads import thread_count

LANES = 16  # output channels per zmm
MIN_M = 4  # fewer rows: the GEMV micro-kernels (one weight pass per row) are the right shape
MT = 64  # activation rows per parallel task
# Epilogue modes: the int32 product, or floats ``float32(acc) * scale`` (SCALED), ``+ bias`` (BIAS),
# ``+ residual`` (RESIDUAL), then clamped to [lo, hi] (-inf/inf: no clamp). ROWS: the product is also
# multiplied by its row's factor ``res[row]`` before the bias (per-row activation steps; ``res`` then
# holds one float32 per row and no residual is added).
# CODES: those floats (no residual) are quantized with the next conv's step into its padded input codes
# (``out8``, pixel of each row in ``dst``), as ``conv_nhwc._pad_codes`` would quantize them.
# FLOATS (with CODES): both; the floats as in the float modes (residual and all) are stored, then quantized from
# there (``store_codes_of``): a value with other users beside the next conv (a residual stream).
INT32, SCALED, BIAS, RESIDUAL, ROWS, CODES, FLOATS = 0, 1, 2, 4, 8, 16, 32
SCALED_BIASED = SCALED | BIAS
NO_CLAMP = (np.float32(-np.inf), np.float32(np.inf))
_F32X16 = ir.VectorType(ir.FloatType(), 16)
_I32X16 = ir.VectorType(ir.IntType(32), 16)
_I8X16 = ir.VectorType(ir.IntType(8), 16)
_MASK16 = ir.VectorType(ir.IntType(1), 16)


def _first_lanes(context, builder, count, count_type) -> ir.Value:
    """The ``<16 x i1>`` mask of lanes ``0 .. count-1`` (``count`` >= 16: all)."""
    c = context.cast(builder, count, count_type, types.int32)
    vec = builder.insert_element(ir.Constant(_I32X16, None), c, ir.Constant(ir.IntType(32), 0))
    splat = builder.shuffle_vector(vec, vec, ir.Constant(_I32X16, [0] * 16))
    return builder.icmp_signed("<", ir.Constant(_I32X16, list(range(16))), splat)


def _masked_load(builder, ptr, vec: ir.VectorType, mask, align: int) -> ir.Value:
    """``llvm.masked.load`` of ``vec`` at ``ptr``, lanes outside ``mask`` zero and never read: a partial
    channel block costs one masked ``vmovups`` instead of a scalar loop, and never reads past the array."""
    name = f"llvm.masked.load.v16{'f32' if vec == _F32X16 else f'i{vec.element.width}'}.p0"
    fnty = ir.FunctionType(vec, [ptr.type, ir.IntType(32), _MASK16, vec])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), align), mask, ir.Constant(vec, None)])


def _masked_store(builder, value, ptr, mask, align: int) -> None:
    """``llvm.masked.store`` of the lanes of ``value`` in ``mask`` at ``ptr``."""
    vec = value.type
    name = f"llvm.masked.store.v16{'f32' if vec == _F32X16 else f'i{vec.element.width}'}.p0"
    fnty = ir.FunctionType(ir.VoidType(), [vec, ptr.type, ir.IntType(32), _MASK16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [value, ptr, ir.Constant(ir.IntType(32), align), mask])


def _splat(builder, x) -> ir.Value:
    """``x`` (a float32 scalar) in all 16 lanes."""
    vec = builder.insert_element(ir.Constant(_F32X16, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(_I32X16, [0] * 16))


@intrinsic
def load_f32_bits(typingctx, arr, idx, count):
    """The float32 ``arr[idx:idx+count]`` (``count`` <= 16; lanes past it 0 and never read) as the bits of an
    ``i32x16``: ``finish`` loads a block's scales and biases once for its four rows. Loaded per row inside
    the store, they were loaded four times: LLVM cannot keep them across the stores, which might alias them."""
    if not (arr == types.Array(types.float32, 1, "C") and isinstance(idx, types.Integer)
            and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [pos]), _F32X16.as_pointer())
        mask = _first_lanes(context, builder, args[2], sig.args[2])
        return builder.bitcast(_masked_load(builder, ptr, _F32X16, mask, 4), _I32X16)

    return i32x16(arr, idx, count), codegen


simd.pin_uuid(load_f32_bits, "gemm_vnni.load_f32_bits")


def _mode_flag(context, builder, mode, mode_type, bit: int) -> ir.Value:
    """Whether the epilogue ``mode`` (an integer argument) has ``bit`` set, as an ``i1``."""
    m = context.cast(builder, mode, mode_type, types.int64)
    return builder.icmp_unsigned("!=", builder.and_(m, ir.Constant(ir.IntType(64), bit)),
                                 ir.Constant(ir.IntType(64), 0))


def _clamped(builder, y, lo, hi) -> ir.Value:
    """``y`` clamped to the float32 scalars ``[lo, hi]`` by two compare-selects, which keep NaN and -0.0 as
    torch's relu/hardtanh do."""
    low, high = _splat(builder, lo), _splat(builder, hi)
    y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
    return builder.select(builder.fcmp_ordered(">", y, high), high, y)


@intrinsic
def store_epilogue(typingctx, out, idx, v, sv, bv, res, mode, lo, hi, row_scale, count):
    """``out[idx:idx+count] = clamp(float32(v) * scale (* row_scale) (+ bias) (+ res[idx:]), lo, hi)`` for the
    first ``count`` (<= 16) lanes, ``scale``/``bias`` the block's (``sv``/``bv``: ``load_f32_bits``), the float
    ops of the reference in its order (``vmulps`` and ``vaddps``s, never an FMA; the clamp as ``_clamped``).
    ``res`` is read only when ``mode & RESIDUAL``, ``row_scale`` used only when ``mode & ROWS``. The residual's
    load and the store are masked to the ``count`` lanes, so a partial channel block (``n`` not a multiple of
    16) takes the same path: the scalar loop it had, inlined 16 times per tile, spilled the tile's registers
    and cost 25-40 % of a K = 64 conv GEMM."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == f32 and res == f32 and v == sv == bv == i32x16
            and all(isinstance(a, types.Integer) for a in (idx, mode, count))
            and lo == hi == row_scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v_a, sv_a, bv_a, res_a, mode_a, lo_a, hi_a, rs_a, count_a = args
        mask = _first_lanes(context, builder, count_a, sig.args[10])

        def ptr(k, pos_k):
            ary = context.make_array(sig.args[k])(context, builder, value=args[k])
            pos = context.cast(builder, args[pos_k], sig.args[pos_k], types.intp)
            return builder.bitcast(builder.gep(ary.data, [pos]), _F32X16.as_pointer())

        def flag(bit):
            return _mode_flag(context, builder, mode_a, sig.args[6], bit)

        y = builder.fmul(builder.sitofp(v_a, _F32X16), builder.bitcast(sv_a, _F32X16))
        y = builder.select(flag(ROWS), builder.fmul(y, _splat(builder, rs_a)), y)
        y = builder.select(flag(BIAS), builder.fadd(y, builder.bitcast(bv_a, _F32X16)), y)
        slot = cgutils.alloca_once_value(builder, y)
        with builder.if_then(flag(RESIDUAL)):
            builder.store(builder.fadd(y, _masked_load(builder, ptr(5, 1), _F32X16, mask, 4)), slot)
        _masked_store(builder, _clamped(builder, builder.load(slot), lo_a, hi_a), ptr(0, 1), mask, 4)
        return context.get_dummy_value()

    return types.none(out, idx, v, sv, bv, res, mode, lo, hi, row_scale, count), codegen


simd.pin_uuid(store_epilogue, "gemm_vnni.store_epilogue")


@intrinsic
def store_codes(typingctx, out8, idx, v, sv, bv, mode, lo, hi, step, qlo, qhi, shift, count):
    """``out8[idx:idx+count]`` (``count`` <= 16 lanes, masked as in ``store_epilogue``) = the int8 codes
    ``rint(clip(y / step, qlo, qhi)) - shift`` of ``y = clamp(float32(v) * scale (+ bias), lo, hi)``:
    ``store_epilogue``'s floats (no residual), quantized with the float ops of ``conv_nhwc._pad_codes`` (a true
    division, round half to even), so the next conv reads the codes it would have made from them. The four
    constants are float32 values, so they stay in registers (read from an array, they were reloaded for every
    store, which might alias them: 1x1 conv 56x56 64 -> 256 into codes, 275-291 -> 253-255 us with this and the
    block's scales and biases loaded once, AMD Zen 4, 2 threads). ``y`` is never NaN here (finite scale and
    bias: the caller checks)."""
    if not (out8 == types.Array(types.int8, 1, "C") and v == sv == bv == i32x16
            and all(isinstance(a, types.Integer) for a in (idx, mode, count))
            and lo == hi == step == qlo == qhi == shift == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v_a, sv_a, bv_a, mode_a, lo_a, hi_a, count_a = *args[:8], args[12]
        mask = _first_lanes(context, builder, count_a, sig.args[12])
        ary = context.make_array(sig.args[0])(context, builder, value=out_a)
        pos = context.cast(builder, idx_a, sig.args[1], types.intp)
        step, qlo, qhi, shift = (_splat(builder, q) for q in args[8:12])
        y = builder.fmul(builder.sitofp(v_a, _F32X16), builder.bitcast(sv_a, _F32X16))
        biased = _mode_flag(context, builder, mode_a, sig.args[5], BIAS)
        y = _clamped(builder, builder.select(biased, builder.fadd(y, builder.bitcast(bv_a, _F32X16)), y), lo_a, hi_a)
        y = builder.fdiv(y, step)
        y = builder.select(builder.fcmp_ordered("<", y, qlo), qlo, y)
        y = builder.select(builder.fcmp_ordered(">", y, qhi), qhi, y)
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X16, [_F32X16]), "llvm.rint.v16f32")
        code = builder.sub(builder.fptosi(builder.call(rint, [y]), _I32X16), builder.fptosi(shift, _I32X16))
        _masked_store(builder, builder.trunc(code, _I8X16), builder.bitcast(builder.gep(ary.data, [pos]),
                                                                             _I8X16.as_pointer()), mask, 1)
        return context.get_dummy_value()

    return types.none(out8, idx, v, sv, bv, mode, lo, hi, step, qlo, qhi, shift, count), codegen


simd.pin_uuid(store_codes, "gemm_vnni.store_codes")


@intrinsic
def store_codes_of(typingctx, out8, cidx, y, fidx, step, qlo, qhi, shift, count, nan):
    """``out8[cidx:cidx+count]`` = the codes ``rint(clip(y / step, qlo, qhi)) - shift`` of the floats
    ``y[fidx:fidx+count]`` (``count`` <= 16 lanes, masked), the float ops of ``conv_nhwc._pad_codes``; ``nan[0]``
    = 1 if any of them is NaN (whose code is meaningless: the caller then hands on the floats, as ``_pad_codes``
    reports NaN). The floats were just stored by ``store_epilogue``: the load is from L1."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out8 == types.Array(types.int8, 1, "C") and y == f32 and nan == types.Array(types.int32, 1, "C")
            and all(isinstance(a, types.Integer) for a in (cidx, fidx, count))
            and step == qlo == qhi == shift == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, cidx_a, y_a, fidx_a, step_a, qlo_a, qhi_a, shift_a, count_a, nan_a = args
        mask = _first_lanes(context, builder, count_a, sig.args[8])

        def ptr(k, pos_k, vec):
            ary = context.make_array(sig.args[k])(context, builder, value=args[k])
            pos = context.cast(builder, args[pos_k], sig.args[pos_k], types.intp)
            return builder.bitcast(builder.gep(ary.data, [pos]), vec.as_pointer())

        y = _masked_load(builder, ptr(2, 3, _F32X16), _F32X16, mask, 4)
        seen = builder.bitcast(builder.and_(builder.fcmp_unordered("uno", y, y), mask), ir.IntType(16))
        with builder.if_then(builder.icmp_unsigned("!=", seen, ir.Constant(ir.IntType(16), 0)), likely=False):
            flag = context.make_array(sig.args[9])(context, builder, value=nan_a)
            builder.store(ir.Constant(ir.IntType(32), 1), flag.data)
        step, qlo, qhi, shift = (_splat(builder, q) for q in (step_a, qlo_a, qhi_a, shift_a))
        q = builder.fdiv(y, step)
        q = builder.select(builder.fcmp_ordered("<", q, qlo), qlo, q)
        q = builder.select(builder.fcmp_ordered(">", q, qhi), qhi, q)
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X16, [_F32X16]), "llvm.rint.v16f32")
        code = builder.sub(builder.fptosi(builder.call(rint, [q]), _I32X16), builder.fptosi(shift, _I32X16))
        _masked_store(builder, builder.trunc(code, _I8X16), ptr(0, 1, _I8X16), mask, 1)
        return context.get_dummy_value()

    return types.none(out8, cidx, y, fidx, step, qlo, qhi, shift, count, nan), codegen


simd.pin_uuid(store_codes_of, "gemm_vnni.store_codes_of")


@intrinsic
def store_first_i32(typingctx, out, idx, v, count):
    """``out[idx:idx+count] = v[:count]`` (int32, ``count`` <= 16 lanes, one masked store)."""
    if not (out == types.Array(types.int32, 1, "C") and v == i32x16
            and isinstance(idx, types.Integer) and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [pos]), _I32X16.as_pointer())
        _masked_store(builder, args[2], ptr, _first_lanes(context, builder, args[3], sig.args[3]), 4)
        return context.get_dummy_value()

    return types.none(out, idx, v, count), codegen


simd.pin_uuid(store_first_i32, "gemm_vnni.store_first_i32")


# Module level, not closures of `driver`: Numba keys a cached closure by pickling its cells, and these
# dispatchers pickle differently once compiled, so the core saved under one key and looked up another.
@njit(inline="always")
def taps_sum(psum, tappix, p):
    s = 0
    for t in range(tappix.shape[0]):
        s += psum[p + tappix[t]]
    return s


@njit(inline="always")
def put(mode, out_i, out_f, epi, row, pix, col, n, v, sv, bv):
    """Store one row's 16-channel block (fewer at the last block of an ``n`` not a multiple of 16); ``sv``,
    ``bv``: the block's scales and biases (``load_f32_bits``)."""
    _, _, res, lo, hi, _, _, _, _, _, _ = epi
    count = min(LANES, n - col)
    if mode == INT32:
        store_first_i32(out_i, row * n + col, v, count)
    else:
        row_scale = res[row] if mode & ROWS else np.float32(1)
        store_epilogue(out_f, row * n + col, v, sv, bv, res, mode, lo, hi, row_scale, count)


@njit(inline="always")
def put_codes(mode, out_i, out_f, epi, row, pix, col, n, v, sv, bv):
    """``put`` of the CODES mode: the row goes to pixel ``pix`` of the next conv's padded codes."""
    _, _, _, lo, hi, out8, step, qlo, qhi, shift, c4n = epi
    store_codes(out8, pix * c4n + col, v, sv, bv, mode, lo, hi, step, qlo, qhi, shift, min(LANES, n - col))


@njit(inline="always")
def put_both(mode, out_i, out_f, epi, row, pix, col, n, v, sv, bv):
    """``put`` of the FLOATS | CODES mode: the row's floats at ``row``, their codes at pixel ``pix`` of the next
    conv's padded codes; ``out_i`` is the NaN flag (``store_codes_of``)."""
    _, _, res, lo, hi, out8, step, qlo, qhi, shift, c4n = epi
    count = min(LANES, n - col)
    store_epilogue(out_f, row * n + col, v, sv, bv, res, mode, lo, hi, np.float32(1), count)
    store_codes_of(out8, pix * c4n + col, out_f, row * n + col, step, qlo, qhi, shift, count, out_i)


@njit(inline="always")
def finish(mode, out_i, out_f, epi, cw, i, rows, col, n, s, pix, v0, v1, v2, v3):
    """Store rows ``i..i+rows`` of one 16-channel block (``pix``: their pixels in CODES mode)."""
    c = load_i32x16(cw, col)
    if mode == INT32:  # no scales: ``run`` passes a 16-lane placeholder
        sv, bv = c, c
    else:
        count = min(LANES, n - col)
        sv, bv = load_f32_bits(epi[0], col, count), load_f32_bits(epi[1], col, count)
    put(mode, out_i, out_f, epi, i, pix[0], col, n, add_i32x16(add_i32x16(v0, c), splat_i32x16(-s[0])), sv, bv)
    if rows > 1:
        put(mode, out_i, out_f, epi, i + 1, pix[1], col, n, add_i32x16(add_i32x16(v1, c), splat_i32x16(-s[1])), sv,
            bv)
    if rows > 2:
        put(mode, out_i, out_f, epi, i + 2, pix[2], col, n, add_i32x16(add_i32x16(v2, c), splat_i32x16(-s[2])), sv,
            bv)
    if rows > 3:
        put(mode, out_i, out_f, epi, i + 3, pix[3], col, n, add_i32x16(add_i32x16(v3, c), splat_i32x16(-s[3])), sv,
            bv)


@njit(inline="always")
def no_dests(b, oh, ow, ho, wo, hp, wp, ph, pw):
    """``four_dests`` of the float epilogues, which store by row: nothing to work out."""
    return 0, 0, 0, 0


simd.pin_kernels("gemm_vnni", taps_sum, put, put_codes, put_both, finish, no_dests)
dests = no_dests  # what ``_core`` calls: ``driver`` binds it per variant (``simd.cache_variant``), as ``finish``
finish_codes = simd.pin_uuid(njit(inline="always")(simd.cache_variant(finish.py_func, "codes", put=put_codes)),
                             "gemm_vnni.finish_codes")
finish_both = simd.pin_uuid(njit(inline="always")(simd.cache_variant(finish.py_func, "both", put=put_both)),
                            "gemm_vnni.finish_both")


# The task body of ``driver``: module level, so ``simd.cache_variant`` can bind its epilogue (``finish``, ``dests``).
def _core(a8, psum, tapoff, tappix, wp, cw, offset, m, n, n_pad, cq, ps, geo, mode, out_i, out_f, scale, bias, res,
         lo, hi, out8, cgeo, q8):
    # CODES: out8 = the next conv's padded codes, cgeo = its (Hp, Wp, ph, pw, c4), q8 = (step, lo, hi, shift)
    ho, wo, hp, wpad, sh, sw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    hp2, wp2, ph2, pw2 = cgeo[0], cgeo[1], cgeo[2], cgeo[3]
    hw = ho * wo
    # a 1x1 stride-1 conv on an unpadded input reads pixel i for row i, and an unpadded next buffer (a depthwise
    # conv's) takes row i at pixel i: no pixel walk (``gemm_avx2``'s shortcut)
    flat_in = hp == ho and wpad == wo and sh == 1 and sw == 1
    flat_out = (mode & CODES) != 0 and hp2 == ho and wp2 == wo and ph2 == 0 and pw2 == 0
    walk = not flat_in or ((mode & CODES) != 0 and not flat_out)
    ntaps = tapoff.shape[0]
    ws = ntaps * cq * 64  # bytes per 16-channel block
    nblk = n_pad // LANES
    ntiles = (nblk + 3) // 4
    mtiles = (m + MT - 1) // MT
    for t in prange(ntiles * mtiles):
        nt = t // mtiles
        mt = t - nt * mtiles
        b0 = nt * 4
        b1 = min(nblk, b0 + 4)
        o1, o2, o3 = min(1, b1 - b0 - 1) * ws, min(2, b1 - b0 - 1) * ws, min(3, b1 - b0 - 1) * ws
        narrow = b1 - b0 <= 2
        s = np.zeros(4, dtype=np.int64)
        epi = (scale, bias, res, lo, hi, out8, q8[0], q8[1], q8[2], q8[3], cgeo[4])  # q8 as values: registers
        pb, poh, pw = first_pixel(mt * MT, hw, wo)
        for i in range(mt * MT, min(m, mt * MT + MT), 4):
            rows = min(4, m - i)
            if walk:
                p0, p1, p2, p3, pb, poh, pw = four_pixels(pb, poh, pw, rows, ho, wo, hp, wpad, sh, sw)
            else:  # pixel = row (rows past m repeat the last real one, as four_pixels')
                p0, p1, p2, p3 = i, i + min(1, rows - 1), i + min(2, rows - 1), i + min(3, rows - 1)
            if offset != 0:
                s[0] = offset * taps_sum(psum, tappix, p0)
                s[1] = offset * taps_sum(psum, tappix, p1)
                s[2] = offset * taps_sum(psum, tappix, p2)
                s[3] = offset * taps_sum(psum, tappix, p3)
            a0, a1, a2, a3 = p0 * ps, p1 * ps, p2 * ps, p3 * ps
            # a partial tile (n_pad not a multiple of 64) re-reads its last block in the missing
            # slots and stores only its own: one loop body (the per-block loop it replaced ran
            # 3-6x slower per block, 1x1 conv 112x112 16 -> 96: 6.3 ms vs 2.0 ms for 16 -> 128).
            # A tile of one or two blocks runs a 4 x 32 loop instead, without the two missing blocks'
            # multiplies, which were half or three quarters of its work: MobileNetV2's projections
            # (N = 16-32), AMD EPYC Zen 4, 2 threads: 112x112 32 -> 16 95 -> 65 us, 56x56 144 -> 24 81 -> 50 us
            z = zero_i32x16()
            c00, c01, c02, c03, c10, c11, c12, c13 = z, z, z, z, z, z, z, z
            c20, c21, c22, c23, c30, c31, c32, c33 = z, z, z, z, z, z, z, z
            for tap in range(ntaps if narrow else 0):  # at most two blocks: no multiplies for the missing two
                d = tapoff[tap]
                wb = b0 * ws + tap * cq * 64
                for q in range(cq):
                    wq = wb + q * 64
                    w0 = load_i8x64(wp, wq)
                    w1 = load_i8x64(wp, wq + o1)
                    x = bcast4_i8x64(a8, a0 + d + 4 * q)
                    c00, c01 = dpbusd512(c00, w0, x), dpbusd512(c01, w1, x)
                    x = bcast4_i8x64(a8, a1 + d + 4 * q)
                    c10, c11 = dpbusd512(c10, w0, x), dpbusd512(c11, w1, x)
                    x = bcast4_i8x64(a8, a2 + d + 4 * q)
                    c20, c21 = dpbusd512(c20, w0, x), dpbusd512(c21, w1, x)
                    x = bcast4_i8x64(a8, a3 + d + 4 * q)
                    c30, c31 = dpbusd512(c30, w0, x), dpbusd512(c31, w1, x)
            for tap in range(0 if narrow else ntaps):
                d = tapoff[tap]
                wb = b0 * ws + tap * cq * 64
                for q in range(cq):
                    wq = wb + q * 64
                    w0 = load_i8x64(wp, wq)
                    w1 = load_i8x64(wp, wq + o1)
                    w2 = load_i8x64(wp, wq + o2)
                    w3 = load_i8x64(wp, wq + o3)
                    x = bcast4_i8x64(a8, a0 + d + 4 * q)
                    c00, c01, c02, c03 = (dpbusd512(c00, w0, x), dpbusd512(c01, w1, x),
                                          dpbusd512(c02, w2, x), dpbusd512(c03, w3, x))
                    x = bcast4_i8x64(a8, a1 + d + 4 * q)
                    c10, c11, c12, c13 = (dpbusd512(c10, w0, x), dpbusd512(c11, w1, x),
                                          dpbusd512(c12, w2, x), dpbusd512(c13, w3, x))
                    x = bcast4_i8x64(a8, a2 + d + 4 * q)
                    c20, c21, c22, c23 = (dpbusd512(c20, w0, x), dpbusd512(c21, w1, x),
                                          dpbusd512(c22, w2, x), dpbusd512(c23, w3, x))
                    x = bcast4_i8x64(a8, a3 + d + 4 * q)
                    c30, c31, c32, c33 = (dpbusd512(c30, w0, x), dpbusd512(c31, w1, x),
                                          dpbusd512(c32, w2, x), dpbusd512(c33, w3, x))
            col = b0 * LANES
            pix = (i, i + 1, i + 2, i + 3) if flat_out else dests(pb, poh, pw, ho, wo, hp2, wp2, ph2, pw2)
            finish(mode, out_i, out_f, epi, cw, i, rows, col, n, s, pix, c00, c10, c20, c30)
            if b1 - b0 > 1:
                finish(mode, out_i, out_f, epi, cw, i, rows, col + 16, n, s, pix, c01, c11, c21, c31)
            if b1 - b0 > 2:
                finish(mode, out_i, out_f, epi, cw, i, rows, col + 32, n, s, pix, c02, c12, c22, c32)
            if b1 - b0 > 3:
                finish(mode, out_i, out_f, epi, cw, i, rows, col + 48, n, s, pix, c03, c13, c23, c33)


@functools.cache
def driver(codes: bool = False, floats: bool = False):
    """The implicit GEMM over (row tile, 64-channel tile) tasks (module docstring); run it inside
    ``threads_if(parallel)``. ``codes``: the variant whose epilogue writes the next conv's input codes
    (CODES mode), compiled apart so the float epilogues' kernel stays as large as it was (compiling
    both stores in one kernel doubled its compile time); with ``floats`` too, the one writing both
    (FLOATS | CODES)."""
    tag = "both" if codes and floats else "codes" if codes else "floats"
    core = simd.cache_variant(_core, tag, finish={"both": finish_both, "codes": finish_codes}.get(tag, finish),
                              dests=four_dests if codes else no_dests)
    return simd.pin_uuid(njit(parallel=True, cache=True)(core), f"gemm_vnni.core.{tag}")


@contextlib.contextmanager
def threads_if(parallel: bool) -> Iterator[None]:
    """Numba's threads for the block if ``parallel``, else one. Serial GEMMs run the parallel
    driver on one thread: compiled without ``prange`` (the task body inlined into one loop nest
    that spills its registers), the same code ran 3-20x slower (1x1 conv 56x56, 64 -> 256:
    8.7 ms against 0.53 ms)."""
    if parallel:
        yield
        return
    threads = thread_count()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


NO_F32 = np.zeros(LANES, dtype=np.float32)
NO_I32 = np.zeros(LANES, dtype=np.int32)
NO_CODES = (np.zeros(LANES, dtype=np.int8), np.zeros(5, dtype=np.int64), np.ones(4, dtype=np.float32))  # out8, cgeo, q8


def run(a8: np.ndarray, asum: np.ndarray, w: PackedWeight, shift: int, m: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` = the exact int32 product of one group (``a8`` rows of ``w.k_pad`` bytes, pad columns
    zero, ``asum`` their sums)."""
    blocks = weight_blocks(w)
    cw = (shift * blocks.cw_base).astype(np.int32)
    with threads_if(parallel):
        driver()(a8, asum, ONE_TAP, ONE_TAP, blocks.data, cw, blocks.offset, m, w.n, blocks.n_pad, blocks.cq,
                 w.k_pad, GEMM_GEO, INT32, out.reshape(-1), NO_F32, NO_F32, NO_F32, NO_F32, *NO_CLAMP, *NO_CODES)


def conv_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
              scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple,
              parallel: bool, a_max: int = 128
              ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], None]:
    """The implicit-GEMM conv, ``run(a8, psum, y, res)``: ``y`` (m, n) float32 = the dequantized conv of padded
    NHWC shifted codes ``a8`` (``hp x wpad`` pixels of ``c4`` bytes, per-pixel sums ``psum``; ``geom`` from
    ``conv.conv_geometry``), ``+ res`` (float32, ``y``'s layout, when ``residual``), clamped to ``clamp``.
    ``a_max`` (the largest ``|a8|``) is the engine interface's: ``vpdpbusd`` sums in s32, so it is unused here
    (``gemm_avx2.chunk_steps``).
    Every argument that is the same from call to call is bound once: a compiled model calls a layer at one
    shape over and over, and building the ~20 arguments took as long as a small layer's GEMM."""
    off, pix, data, cw, offset, n, n_pad, cq, c4, geo = conv_launch(w, shift, c, geom, hp, wpad)
    mode = (SCALED if bias is None else SCALED_BIASED) | (RESIDUAL if residual else 0)
    core = driver()
    head = (off, pix, data, cw, offset, m, n, n_pad, cq, c4, geo, mode, NO_I32)
    tail = (np.float32(clamp[0]), np.float32(clamp[1]))
    bias_arg = scale if bias is None else bias

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None) -> None:
        args = (a8, psum, *head, y.reshape(-1), scale, bias_arg, NO_F32 if res is None else res.reshape(-1), *tail,
                *NO_CODES)
        if parallel:
            core(*args)
            return
        with threads_if(False):
            core(*args)

    return run


def conv_codes_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
                    scale: np.ndarray, bias: np.ndarray | None, clamp: tuple, parallel: bool, nxt_padded: tuple,
                    nxt_pad: tuple[int, int], nxt_quant: tuple,
                    a_max: int = 128) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``conv_gemm`` whose results go straight into the next conv's padded input codes: ``run(a8, psum,
    out8)`` writes the interior pixels' first ``n`` channels of ``out8`` (``nxt_padded`` = its (B, Hp, Wp,
    c4), ``nxt_pad`` its (ph, pw)), quantized with ``nxt_quant`` = (step, lo, hi, shift), the next conv's
    ``_pad_codes`` arguments. The floats are never stored."""
    both = conv_both_gemm(w, shift, c, geom, hp, wpad, m, scale, bias, False, clamp, parallel, nxt_padded, nxt_pad,
                          nxt_quant, floats=False)

    def run(a8: np.ndarray, psum: np.ndarray, out8: np.ndarray) -> None:
        both(a8, psum, NO_F32, None, out8, NO_I32)

    return run


def conv_both_gemm(w: PackedWeight, shift: int, c: int, geom: tuple[int, ...], hp: int, wpad: int, m: int,
                   scale: np.ndarray, bias: np.ndarray | None, residual: bool, clamp: tuple, parallel: bool,
                   nxt_padded: tuple, nxt_pad: tuple[int, int], nxt_quant: tuple, a_max: int = 128,
                   floats: bool = True) -> Callable[..., None]:
    """``conv_gemm``'s floats and ``conv_codes_gemm``'s codes of them in one pass (FLOATS | CODES), for a conv whose
    result feeds the next conv and other ops too (``layout.code_chains``): ``run(a8, psum, y, res, out8, nan)``
    stores ``y`` (``+ res`` when ``residual``, clamped) and the next conv's codes of ``y`` in ``out8``; ``nan[0]``
    becomes 1 if ``y`` holds a NaN (the codes are then not to be used). Without ``floats``: the codes alone."""
    off, pix, data, cw, offset, n, n_pad, cq, c4, geo = conv_launch(w, shift, c, geom, hp, wpad)
    core = driver(codes=True, floats=floats)
    mode = (CODES | (FLOATS | SCALED if floats else 0) | (0 if bias is None else BIAS)
            | (RESIDUAL if residual else 0))
    head = (off, pix, data, cw, offset, m, n, n_pad, cq, c4, geo, mode)
    bias_arg = scale if bias is None else bias
    lo, hi = np.float32(clamp[0]), np.float32(clamp[1])
    cgeo = np.array((nxt_padded[1], nxt_padded[2], nxt_pad[0], nxt_pad[1], nxt_padded[3]), dtype=np.int64)
    q8 = np.array(nxt_quant, dtype=np.float32)

    def run(a8: np.ndarray, psum: np.ndarray, y: np.ndarray, res: np.ndarray | None, out8: np.ndarray,
            nan: np.ndarray) -> None:
        args = (a8, psum, *head, nan, y.reshape(-1), scale, bias_arg, NO_F32 if res is None else res.reshape(-1), lo,
                hi, out8, cgeo, q8)
        if parallel:
            core(*args)
            return
        with threads_if(False):
            core(*args)

    return run
