"""256-bit intrinsics for the broadcast GEMM on the AVX2 path (``gemm_avx2``), beside ``simd``'s.

Same conventions as ``simd``: opaque LLVM vector values, one ``@intrinsic`` per instruction
(or per fixed instruction pair), uuids pinned so Numba's disk cache stays effective.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic

from bitmix.kernels.simd import _call, _llty, _splat, element_ptr, i8x32, i16x16, i32x8, pin_uuid, splat_value

_F32X8 = ir.VectorType(ir.FloatType(), 8)


@intrinsic
def bcast4_i8x32(typingctx, arr, idx):
    """The 4 bytes at byte ``idx`` of a 1-D int8/uint8 array, repeated 8 times (``vpbroadcastd ymm``)."""
    if not (isinstance(arr, types.Array) and arr.dtype.bitwidth == 8 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        word = builder.load(element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.IntType(32)),
                            align=1)
        return builder.bitcast(splat_value(builder, _llty(i32x8), word), _llty(i8x32))

    return i8x32(arr, idx), codegen


def _make_words(odd: bool, signed: bool):
    @intrinsic
    def words(typingctx, v):
        """The odd (else even) bytes of a 32-byte vector as 16 words, sign- (else zero-) extended: ``vpsraw`` or
        ``vpsrlw`` by 8 for the odd ones; ``vpsllw`` + ``vpsraw``, or a ``vpand``, for the even ones."""
        if v != i8x32:
            return None

        def codegen(context, builder, sig, args):
            w = builder.bitcast(args[0], _llty(i16x16))
            eight = _splat(i16x16, 8)
            if odd:
                return builder.ashr(w, eight) if signed else builder.lshr(w, eight)
            return builder.ashr(builder.shl(w, eight), eight) if signed else builder.and_(w, _splat(i16x16, 255))

        return i16x16(v), codegen

    return words


even_s8_words = _make_words(odd=False, signed=True)
odd_s8_words = _make_words(odd=True, signed=True)
even_u8_words = _make_words(odd=False, signed=False)
odd_u8_words = _make_words(odd=True, signed=False)


@intrinsic
def madd_i16x16(typingctx, a, b):
    """``vpmaddwd``: s16 x s16, adjacent pairs summed to s32 (exact: no saturation unless both pairs are -2^15)."""
    if a != i16x16 or b != i16x16:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, args, (i16x16, i16x16))

    return i32x8(a, b), codegen


@intrinsic
def splat_i32x8(typingctx, value):
    """``value`` (any integer, truncated to 32 bits) in all 8 lanes."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return splat_value(builder, _llty(i32x8), context.cast(builder, args[0], sig.args[0], types.int32))

    return i32x8(value), codegen


@intrinsic
def load_i32x8(typingctx, arr, idx):
    """Unaligned load of 8 int32 from a 1-D int32 array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _llty(i32x8))
        return builder.load(ptr, align=4)

    return i32x8(arr, idx), codegen


_MASK8 = ir.VectorType(ir.IntType(1), 8)


def _masked(builder, op: str, vty: ir.VectorType, ptr, mask, value=None):
    """``llvm.masked.load``/``store`` of an 8-lane vector (AVX2 ``vmaskmovps``/``vpmaskmovd``)."""
    kind = "f32" if vty == _F32X8 else "i32"
    i32 = ir.IntType(32)
    if op == "load":
        fnty = ir.FunctionType(vty, [ptr.type, i32, _MASK8, vty])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.v8{kind}.p0")
        return builder.call(fn, [ptr, ir.Constant(i32, 4), mask, ir.Constant(vty, None)])
    fnty = ir.FunctionType(ir.VoidType(), [vty, ptr.type, i32, _MASK8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.v8{kind}.p0")
    return builder.call(fn, [value, ptr, ir.Constant(i32, 4), mask])


@intrinsic
def store_lanes_x8(typingctx, out, out_i, idx, v, scale, bias, col, has_bias, row_scale, has_row_scale, count,
                   as_int, res, has_res, lo, hi):
    """The first ``count`` lanes (<= 0: none, >= 8: all) of one output vector: ``out_i[idx + l] = v[l]`` when
    ``as_int``, else ``out[idx + l] = float32(v[l]) * scale[col + l] (* row_scale) (+ bias[col + l])``:
    ``quant``'s dequantize formula, times the row's step where activations step per row (``vcvtdq2ps``,
    ``vmulps``, ``vaddps``; never an FMA, which would skip the product's rounding), ``+ res[idx + l]`` when
    ``has_res``, then clamped to ``[lo, hi]`` by two compare-selects that keep NaN and -0.0 (``gemm_vnni``'s
    ``store_epilogue``: the residual add and ReLU of a conv, with no float pass after it). A full vector takes plain
    loads and stores; a partial one (the last block of an ``n`` not a multiple of 16, or rows past ``m``)
    masked ones, so the tile's epilogue has no scalar loop: one beside it spilled the tile's registers
    (a 1x1 conv with K = 64 ran 1.3-1.5x slower)."""
    f32, i32a = types.Array(types.float32, 1, "C"), types.Array(types.int32, 1, "C")
    if not (out == f32 and out_i == i32a and scale == f32 and bias == f32 and v == i32x8
            and all(isinstance(a, types.Integer) for a in (idx, col, count))
            and isinstance(has_bias, types.Boolean) and row_scale == types.float32
            and isinstance(has_row_scale, types.Boolean) and isinstance(as_int, types.Boolean)
            and res == f32 and isinstance(has_res, types.Boolean) and lo == hi == types.float32):
        return None

    def codegen(context, builder, sig, args):
        (out_a, outi_a, idx_a, v_a, scale_a, bias_a, col_a, has_bias_a, rs_a, has_rs_a, count_a, as_int_a, res_a,
         has_res_a, lo_a, hi_a) = args
        n = context.cast(builder, count_a, sig.args[10], types.int32)
        full = builder.icmp_signed(">=", n, ir.Constant(ir.IntType(32), 8))
        lanes = splat_value(builder, ir.VectorType(ir.IntType(32), 8), n)
        mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8))), lanes)
        out_ptr = element_ptr(context, builder, sig.args[0], out_a, sig.args[2], idx_a, _F32X8)
        int_ptr = element_ptr(context, builder, sig.args[1], outi_a, sig.args[2], idx_a, _llty(i32x8))
        scale_ptr = element_ptr(context, builder, sig.args[4], scale_a, sig.args[6], col_a, _F32X8)
        bias_ptr = element_ptr(context, builder, sig.args[5], bias_a, sig.args[6], col_a, _F32X8)
        res_ptr = element_ptr(context, builder, sig.args[12], res_a, sig.args[2], idx_a, _F32X8)
        rs = splat_value(builder, _F32X8, rs_a)
        low, high = splat_value(builder, _F32X8, lo_a), splat_value(builder, _F32X8, hi_a)

        def floats(load):
            y = builder.fmul(builder.sitofp(v_a, _F32X8), load(scale_ptr))
            y = builder.select(has_rs_a, builder.fmul(y, rs), y)
            y = builder.select(has_bias_a, builder.fadd(y, load(bias_ptr)), y)
            slot = cgutils.alloca_once_value(builder, y)
            with builder.if_then(has_res_a):
                builder.store(builder.fadd(y, load(res_ptr)), slot)
            y = builder.load(slot)
            y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
            return builder.select(builder.fcmp_ordered(">", y, high), high, y)

        with builder.if_else(as_int_a) as (integer, real):
            with integer:
                with builder.if_else(full, likely=True) as (whole, part):
                    with whole:
                        builder.store(v_a, int_ptr, align=4)
                    with part:
                        _masked(builder, "store", _llty(i32x8), int_ptr, mask, v_a)
            with real:
                with builder.if_else(full, likely=True) as (whole, part):
                    with whole:
                        builder.store(floats(lambda p: builder.load(p, align=4)), out_ptr, align=4)
                    with part:
                        y = floats(lambda p: _masked(builder, "load", _F32X8, p, mask))
                        _masked(builder, "store", _F32X8, out_ptr, mask, y)
        return context.get_dummy_value()

    return types.none(out, out_i, idx, v, scale, bias, col, has_bias, row_scale, has_row_scale, count, as_int, res,
                      has_res, lo, hi), codegen


@intrinsic
def store_codes_x8(typingctx, out8, idx, v, scale, bias, col, has_bias, lo, hi, q, count):
    """The first ``count`` lanes (<= 0: none, >= 8: all) of one output vector as the next conv's input codes:
    ``out8[idx + l] = rint(clip(y / q[0], q[1], q[2])) - q[3]`` with ``y = clamp(float32(v[l]) * scale[col + l]
    (+ bias[col + l]), lo, hi)``, the float ops of ``gemm_vnni.store_codes`` (and so of ``conv_nhwc._pad_codes``
    on ``store_lanes_x8``'s floats). ``y`` is never NaN here (finite scale and bias: the caller checks)."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out8 == types.Array(types.int8, 1, "C") and scale == f32 and bias == f32 and q == f32 and v == i32x8
            and all(isinstance(a, types.Integer) for a in (idx, col, count)) and isinstance(has_bias, types.Boolean)
            and lo == hi == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v_a, scale_a, bias_a, col_a, has_bias_a, lo_a, hi_a, q_a, count_a = args
        i8x8 = ir.VectorType(ir.IntType(8), 8)
        i32x8_ty = ir.VectorType(ir.IntType(32), 8)
        n = context.cast(builder, count_a, sig.args[10], types.int32)
        full = builder.icmp_signed(">=", n, ir.Constant(ir.IntType(32), 8))
        mask = builder.icmp_signed("<", ir.Constant(i32x8_ty, list(range(8))), splat_value(builder, i32x8_ty, n))
        out_ptr = element_ptr(context, builder, sig.args[0], out_a, sig.args[1], idx_a, i8x8)
        scale_ptr = element_ptr(context, builder, sig.args[3], scale_a, sig.args[5], col_a, _F32X8)
        bias_ptr = element_ptr(context, builder, sig.args[4], bias_a, sig.args[5], col_a, _F32X8)
        qdata = context.make_array(sig.args[9])(context, builder, value=q_a).data

        def q_at(i):
            return splat_value(builder, _F32X8, builder.load(builder.gep(qdata, [ir.Constant(ir.IntType(64), i)])))

        def codes(load):
            y = builder.fmul(builder.sitofp(v_a, _F32X8), load(scale_ptr))
            y = builder.select(has_bias_a, builder.fadd(y, load(bias_ptr)), y)
            low, high = splat_value(builder, _F32X8, lo_a), splat_value(builder, _F32X8, hi_a)
            y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
            y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
            y = builder.fdiv(y, q_at(0))
            qlo, qhi = q_at(1), q_at(2)
            y = builder.select(builder.fcmp_ordered("<", y, qlo), qlo, y)
            y = builder.select(builder.fcmp_ordered(">", y, qhi), qhi, y)
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X8, [_F32X8]), "llvm.rint.v8f32")
            code = builder.sub(builder.fptosi(builder.call(rint, [y]), i32x8_ty), builder.fptosi(q_at(3), i32x8_ty))
            return builder.trunc(code, i8x8)

        with builder.if_else(full, likely=True) as (whole, part):
            with whole:
                builder.store(codes(lambda p: builder.load(p, align=4)), out_ptr, align=1)
            with part:
                value = codes(lambda p: _masked(builder, "load", _F32X8, p, mask))
                fnty = ir.FunctionType(ir.VoidType(), [i8x8, out_ptr.type, ir.IntType(32), _MASK8])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v8i8.p0")
                builder.call(fn, [value, out_ptr, ir.Constant(ir.IntType(32), 1), mask])
        return context.get_dummy_value()

    return types.none(out8, idx, v, scale, bias, col, has_bias, lo, hi, q, count), codegen



@intrinsic
def store_codes_4x16(typingctx, out8, d0, d1, d2, d3, rows, c00, c01, c10, c11, c20, c21, c30, c31, scale, bias, col,
                     q):
    """A 4-row x 16-channel tile (channels ``col .. col + 15``; row ``r`` = vectors ``cr0, cr1``) as 16 bytes of the
    next conv's input codes per row, at ``out8[d0]`` .. ``out8[d3]`` for the first ``rows`` rows: ``rint(clip(y /
    step, qlo, qhi)) - shift`` with ``y = float32(v) * scale[col + l] + bias[col + l]``, ``store_codes_x8``'s
    result; ``q`` = the tuple ``(step, qlo, qhi, shift, recip, near, rint(qlo), rint(qhi), exact)``
    (``gemm_avx2.tile_codes_bounds``: the conv's clamp folded into ``qlo, qhi``; ``exact`` > 0: every sum these
    channels can reach was checked, ``gemm_avx2.exact_blocks``, and the tile skips the test below). The caller passes
    -0.0 biases for none (``x + -0.0 == x`` bit for bit). No mask or per-store branch: on AVX2 a masked byte store
    is scalar code, and beside it the tile's registers spilled (a 1x1 conv, K = 16, 1.3x slower).

    Cheaper than the formula, same bytes: ``y / step`` is ``y * recip``, which rounds to the quotient's code unless
    it lies within ``0.5 - near`` of a half-code; when any of the tile's 128 does, the whole tile takes the division
    (``vdivps`` held one port 3 cycles a vector, the epilogue's bottleneck). The clip is done on the rounded codes
    (``rint`` is monotone: ``rint(clip(x, lo, hi)) == clip(rint(x), rint(lo), rint(hi))``) in 16-bit lanes, and two
    rows are packed at once with saturating ``vpackssdw``/``vpackuswb`` (signed codes moved up 128 into its range),
    then shifted as bytes (mod 256: ``store_codes_x8``'s truncation)."""
    f32 = types.Array(types.float32, 1, "C")
    vecs = (c00, c01, c10, c11, c20, c21, c30, c31)
    if not (out8 == types.Array(types.int8, 1, "C") and scale == bias == f32 and q == types.UniTuple(types.float32, 9)
            and all(v == i32x8 for v in vecs)
            and all(isinstance(a, types.Integer) for a in (d0, d1, d2, d3, rows, col))):
        return None

    def codegen(context, builder, sig, args):
        out_a, rows_a, (scale_a, bias_a, col_a, q_a) = args[0], args[5], args[14:]
        i32, i16, i8 = ir.IntType(32), ir.IntType(16), ir.IntType(8)
        i32x8_ty, i16x16_ty, i8x32_ty = _llty(i32x8), ir.VectorType(i16, 16), ir.VectorType(i8, 32)
        qv = [builder.extract_value(q_a, i) for i in range(9)]
        step, low, high, recip, near = (splat_value(builder, _F32X8, qv[i]) for i in (0, 1, 2, 4, 5))
        shift, lo16, hi16 = (builder.fptosi(qv[i], i16) for i in (3, 6, 7))
        cvt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32x8_ty, [_F32X8]),
                                             "llvm.x86.avx.cvt.ps2dq.256")
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X8, [_F32X8]), "llvm.fabs.v8f32")
        col = context.cast(builder, col_a, sig.args[16], types.intp)
        slots = [cgutils.alloca_once(builder, i32x8_ty) for _ in range(8)]

        def products(test: bool):
            ys, worst = [], None
            for j, (v, slot) in enumerate(zip(args[6:14], slots, strict=True)):
                half = builder.add(col, ir.Constant(ir.IntType(64), 8 * (j % 2)))
                scale_v, bias_v = (builder.load(element_ptr(context, builder, sig.args[i], a, types.intp, half,
                                                            _F32X8), align=4) for i, a in ((14, scale_a), (15, bias_a)))
                y = builder.fadd(builder.fmul(builder.sitofp(v, _F32X8), scale_v), bias_v)
                x = builder.fmul(y, recip)
                k = builder.call(cvt, [x])
                builder.store(k, slot)
                if test:
                    off = builder.call(fabs, [builder.fsub(x, builder.sitofp(k, _F32X8))])  # large: cvt overflowed
                    worst = off if worst is None else builder.select(builder.fcmp_ordered(">", off, worst), off, worst)
                    ys.append(y)
            return ys, worst

        exact = builder.fcmp_ordered(">", qv[8], ir.Constant(ir.FloatType(), 0))
        with builder.if_else(exact, likely=True) as (checked, unchecked):
            with checked:  # every reachable sum's product rounds to its quotient's code (``exact_blocks``)
                products(test=False)
            with unchecked:
                ys, worst = products(test=True)
                near_half = builder.fcmp_unordered(">=", worst, near)
                any_near = builder.icmp_unsigned("!=", builder.bitcast(near_half, i8), ir.Constant(i8, 0))
                with builder.if_then(any_near, likely=False):  # the exact formula for the whole tile
                    for y, slot in zip(ys, slots, strict=True):
                        x = builder.fdiv(y, step)
                        x = builder.select(builder.fcmp_ordered("<", x, low), low, x)
                        builder.store(builder.call(cvt, [builder.select(builder.fcmp_ordered(">", x, high), high, x)]),
                                      slot)
        wrap = builder.select(builder.icmp_signed("<", lo16, ir.Constant(i16, 0)), ir.Constant(i16, 128),
                              ir.Constant(i16, 0))  # signed codes (within [-128, 127]) move into [0, 255]
        lo_w, hi_w, wrap_w = (splat_value(builder, i16x16_ty, x) for x in (lo16, hi16, wrap))
        sh = builder.trunc(builder.add(shift, wrap), i8)
        sh_b = splat_value(builder, i8x32_ty, sh)
        order = ir.Constant(ir.VectorType(i32, 8), [0, 4, 1, 5, 2, 6, 3, 7])
        i8x16 = ir.VectorType(i8, 16)
        dests = args[1:5]
        for pair in range(2):
            words = []
            for r in (2 * pair, 2 * pair + 1):
                w = _call(builder, "llvm.x86.avx2.packssdw", i16x16, [builder.load(slots[2 * r]),
                                                                       builder.load(slots[2 * r + 1])], (i32x8, i32x8))
                w = builder.select(builder.icmp_signed("<", w, lo_w), lo_w, w)
                w = builder.select(builder.icmp_signed(">", w, hi_w), hi_w, w)
                words.append(builder.add(w, wrap_w))
            packed = _call(builder, "llvm.x86.avx2.packuswb", i8x32, words, (i16x16, i16x16))
            packed = builder.sub(packed, sh_b)  # rows 2 pair, 2 pair + 1 as dwords [a0 b0 c0 d0 | a1 b1 c1 d1]
            dw = builder.bitcast(packed, ir.VectorType(i32, 8))
            packed = builder.bitcast(builder.shuffle_vector(dw, dw, order), i8x32_ty)
            for r in (2 * pair, 2 * pair + 1):
                part = builder.shuffle_vector(packed, packed, ir.Constant(
                    ir.VectorType(i32, 16), list(range(16 * (r % 2), 16 * (r % 2) + 16))))
                ptr = element_ptr(context, builder, sig.args[0], out_a, sig.args[1 + r], dests[r], i8x16)
                rows_left = context.cast(builder, rows_a, sig.args[5], types.intp)
                with builder.if_then(builder.icmp_signed(">", rows_left, ir.Constant(ir.IntType(64), r))):
                    builder.store(part, ptr, align=1)
        return context.get_dummy_value()

    return types.none(out8, d0, d1, d2, d3, rows, c00, c01, c10, c11, c20, c21, c30, c31, scale, bias, col,
                      q), codegen


@intrinsic
def store_floats_x16(typingctx, out, idx, v0, v1, scale, bias, col, row_scale, res, has_res, lo, hi):
    """Two full output vectors (channels ``col .. col + 15``) as floats: ``store_lanes_x8``'s formula with every
    factor applied, ``float32(v[l]) * scale[col + l] * row_scale + bias[col + l] (+ res[idx + l])`` clamped to
    ``[lo, hi]``; the caller passes ``row_scale`` 1 and -0.0 biases where there are none (``x * 1 == x`` and
    ``x + -0.0 == x`` bit for bit, NaN and -0.0 included), so only the residual is a branch. No masks: the
    masked form beside the tile's registers made them spill on AVX2."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == scale == bias == res == f32 and v0 == v1 == i32x8 and isinstance(idx, types.Integer)
            and isinstance(col, types.Integer) and row_scale == lo == hi == types.float32
            and isinstance(has_res, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v0_a, v1_a, scale_a, bias_a, col_a, rs_a, res_a, has_res_a, lo_a, hi_a = args
        rs = splat_value(builder, _F32X8, rs_a)
        low, high = splat_value(builder, _F32X8, lo_a), splat_value(builder, _F32X8, hi_a)
        i64 = ir.IntType(64)
        for half, v in ((0, v0_a), (8, v1_a)):
            at = builder.add(context.cast(builder, col_a, sig.args[6], types.intp), ir.Constant(i64, half))
            to = builder.add(context.cast(builder, idx_a, sig.args[1], types.intp), ir.Constant(i64, half))
            scale_v = builder.load(element_ptr(context, builder, sig.args[4], scale_a, types.intp, at, _F32X8), align=4)
            bias_v = builder.load(element_ptr(context, builder, sig.args[5], bias_a, types.intp, at, _F32X8), align=4)
            y = builder.fadd(builder.fmul(builder.fmul(builder.sitofp(v, _F32X8), scale_v), rs), bias_v)
            slot = cgutils.alloca_once_value(builder, y)
            with builder.if_then(has_res_a):  # a residual's load only where there is one
                r = builder.load(element_ptr(context, builder, sig.args[8], res_a, types.intp, to, _F32X8), align=4)
                builder.store(builder.fadd(y, r), slot)
            y = builder.load(slot)
            y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
            y = builder.select(builder.fcmp_ordered(">", y, high), high, y)
            builder.store(y, element_ptr(context, builder, sig.args[0], out_a, types.intp, to, _F32X8), align=4)
        return context.get_dummy_value()

    return types.none(out, idx, v0, v1, scale, bias, col, row_scale, res, has_res, lo, hi), codegen

for _name, _obj in list(globals().items()):
    if isinstance(_obj, _Intrinsic):
        pin_uuid(_obj, f"simd_avx2.{_name}")
