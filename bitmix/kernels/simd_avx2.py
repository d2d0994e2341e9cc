"""256-bit intrinsics for the broadcast GEMM on the AVX2 path (``gemm_avx2``), beside ``simd``'s.

Same conventions as ``simd``: opaque LLVM vector values, one ``@intrinsic`` per instruction
(or per fixed instruction pair), uuids pinned so Numba's disk cache stays effective.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic

from bitmix.kernels.simd import _call, _llty, i8x32, i16x16, i32x8, pin_uuid

_F32X8 = ir.VectorType(ir.FloatType(), 8)


def _ptr(context, builder, arr_type, arr, idx_type, idx, vty):
    ary = context.make_array(arr_type)(context, builder, value=arr)
    pos = context.cast(builder, idx, idx_type, types.intp)
    return builder.bitcast(builder.gep(ary.data, [pos]), vty.as_pointer())


def _splat_value(builder, vty: ir.VectorType, word: ir.Value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(vty, None), word, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


@intrinsic
def bcast4_i8x32(typingctx, arr, idx):
    """The 4 bytes at byte ``idx`` of a 1-D int8/uint8 array, repeated 8 times (``vpbroadcastd ymm``)."""
    if not (isinstance(arr, types.Array) and arr.dtype.bitwidth == 8 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        word = builder.load(_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.IntType(32)),
                            align=1)
        return builder.bitcast(_splat_value(builder, _llty(i32x8), word), _llty(i8x32))

    return i8x32(arr, idx), codegen


@intrinsic
def madd16_x16(typingctx, v):
    """``vpmaddwd`` with 16s: ``16 * (v[2l] + v[2l+1])`` in s32 lane ``l`` (exact: |v| <= 2^15)."""
    if v != i16x16:
        return None

    def codegen(context, builder, sig, args):
        sixteen = ir.Constant(_llty(i16x16), [16] * 16)
        return _call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, (args[0], sixteen), (i16x16, i16x16))

    return i32x8(v), codegen


@intrinsic
def splat_i32x8(typingctx, value):
    """``value`` (any integer, truncated to 32 bits) in all 8 lanes."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat_value(builder, _llty(i32x8), context.cast(builder, args[0], sig.args[0], types.int32))

    return i32x8(value), codegen


@intrinsic
def load_i32x8(typingctx, arr, idx):
    """Unaligned load of 8 int32 from a 1-D int32 array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _llty(i32x8)), align=4)

    return i32x8(arr, idx), codegen


@intrinsic
def store_i32x8(typingctx, arr, idx, v):
    """Unaligned store of 8 int32 lanes into a 1-D int32 array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(idx, types.Integer)
            and v == i32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _llty(i32x8)),
                      align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def scale_store_f32x8(typingctx, out, idx, v, scale, bias, col, has_bias, row_scale, has_row_scale):
    """``out[idx + l] = float32(v[l]) * scale[col + l] (* row_scale) (+ bias[col + l])`` for the 8 lanes:
    ``quant``'s dequantize formula, times the row's step where activations step per row
    (``vcvtdq2ps``, ``vmulps``, ``vaddps``; never an FMA, which would skip the product's rounding)."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == f32 and scale == f32 and bias == f32 and v == i32x8 and isinstance(idx, types.Integer)
            and isinstance(col, types.Integer) and isinstance(has_bias, types.Boolean)
            and row_scale == types.float32 and isinstance(has_row_scale, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        out_a, idx_a, v_a, scale_a, bias_a, col_a, has_bias_a, rs_a, has_rs_a = args
        s = builder.load(_ptr(context, builder, sig.args[3], scale_a, sig.args[5], col_a, _F32X8), align=4)
        y = builder.fmul(builder.sitofp(v_a, _F32X8), s)
        rs = builder.insert_element(ir.Constant(_F32X8, None), rs_a, ir.Constant(ir.IntType(32), 0))
        rs = builder.shuffle_vector(rs, rs, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        y = builder.select(has_rs_a, builder.fmul(y, rs), y)
        b = builder.load(_ptr(context, builder, sig.args[4], bias_a, sig.args[5], col_a, _F32X8), align=4)
        y = builder.select(has_bias_a, builder.fadd(y, b), y)
        builder.store(y, _ptr(context, builder, sig.args[0], out_a, sig.args[1], idx_a, _F32X8), align=4)
        return context.get_dummy_value()

    return types.none(out, idx, v, scale, bias, col, has_bias, row_scale, has_row_scale), codegen


for _name, _obj in list(globals().items()):
    if isinstance(_obj, _Intrinsic):
        pin_uuid(_obj, f"simd_avx2.{_name}")
