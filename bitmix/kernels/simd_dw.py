"""Sixteen-channel vectors for the register-blocked depthwise kernel (``conv_nhwc._depthwise``): plain LLVM IR.

A depthwise output is ``sum over taps of x[tap pixel, c] * w[tap, c]`` per channel, so 16 adjacent channels of
one output pixel are one vector: every tap adds ``ext(16 input codes) * 16 weight codes`` to it, and the
epilogue (scale, bias, clamp, and for the next conv's codes the quantization) runs on it before one store.
No ISA intrinsics (``zext``, ``mul``, ``sitofp``, ``fdiv``, ``llvm.rint``): LLVM lowers them to the host's
unit on every dispatch path, and each lane does exactly the int and float32 operations of the scalar code,
so results are bit-identical to it. The sums wrap like the scalar int16/int32 ones and are exact wherever
those are (``conv_nhwc._depthwise_taps`` picks int16 only where no sum can overflow).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic

from bitmix.kernels.simd import _llty, element_ptr, i16x16, i32x16, pin_uuid, splat_value

LANES = 16
_F32X16 = ir.VectorType(ir.FloatType(), LANES)
_I32X16 = ir.VectorType(ir.IntType(32), LANES)


def _acc_of(taps) -> object:
    """The accumulator vector type of a tap array: int16 taps sum in ``i16x16``, int32 ones in ``i32x16``."""
    if isinstance(taps, types.Array) and taps.ndim == 1 and taps.dtype in (types.int16, types.int32):
        return i16x16 if taps.dtype == types.int16 else i32x16
    return None




def _is_int8(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.int8, types.uint8)


@intrinsic
def acc_zero(typingctx, taps):
    """A zero accumulator for 16 channels of ``taps`` (1-D int16 or int32)."""
    acc = _acc_of(taps)
    if acc is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_llty(acc), None)

    return acc(taps), codegen


@intrinsic
def mac(typingctx, acc, x, xi, taps, ti):
    """``acc + ext(x[xi:xi + 16]) * taps[ti:ti + 16]`` lane-wise, wrapping in ``acc``'s width: ``x`` 1-D uint8
    (zero-extended) or int8 (sign-extended) codes, ``taps`` the weight codes of ``acc_zero``'s dtype."""
    if not (acc == _acc_of(taps) and _is_int8(x) and isinstance(xi, types.Integer)
            and isinstance(ti, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        acc_a, x_a, xi_a, taps_a, ti_a = args
        vty = _llty(sig.args[0])
        xv = builder.load(element_ptr(context, builder, sig.args[1], x_a, sig.args[2], xi_a,
                               ir.VectorType(ir.IntType(8), LANES)), align=1)
        xv = builder.sext(xv, vty) if sig.args[1].dtype.signed else builder.zext(xv, vty)
        wv = builder.load(element_ptr(context, builder, sig.args[3], taps_a, sig.args[4], ti_a, vty),
                          align=vty.element.width // 8)
        return builder.add(acc_a, builder.mul(xv, wv))

    return acc(acc, x, xi, taps, ti), codegen


def _scaled(context, builder, acc, scale, bias, col) -> ir.Value:
    """``float32(acc) * scale[col:col + 16] + bias[col:col + 16]`` (``vmulps``, ``vaddps``: never an FMA)."""
    acc_a, acc_t = acc
    wide = builder.sext(acc_a, _I32X16) if acc_t == i16x16 else acc_a
    scale_v = builder.load(element_ptr(context, builder, scale[1], scale[0], col[1], col[0], _F32X16), align=4)
    bias_v = builder.load(element_ptr(context, builder, bias[1], bias[0], col[1], col[0], _F32X16), align=4)
    return builder.fadd(builder.fmul(builder.sitofp(wide, _F32X16), scale_v), bias_v)


def _clip(builder, y: ir.Value, low: ir.Value, high: ir.Value) -> ir.Value:
    """``y`` clamped to ``[low, high]`` by two compare-selects that keep NaN and -0.0 (``conv_nhwc``'s scalar
    ``lo if v < lo else v``)."""
    y = builder.select(builder.fcmp_ordered("<", y, low), low, y)
    return builder.select(builder.fcmp_ordered(">", y, high), high, y)


@intrinsic
def store_floats(typingctx, out, oi, acc, scale, bias, col, lo, hi):
    """``out[oi + l] = clamp(float32(acc[l]) * scale[col + l] + bias[col + l], lo, hi)`` for 16 lanes; a layer
    without bias passes -0.0s (``x + -0.0`` is ``x`` bit for bit, -0.0 and NaN included)."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out == scale == bias == f32 and acc in (i16x16, i32x16) and isinstance(oi, types.Integer)
            and isinstance(col, types.Integer) and lo == hi == types.float32):
        return None

    def codegen(context, builder, sig, args):
        out_a, oi_a, acc_a, scale_a, bias_a, col_a, lo_a, hi_a = args
        y = _scaled(context, builder, (acc_a, sig.args[2]), (scale_a, sig.args[3]), (bias_a, sig.args[4]),
                    (col_a, sig.args[5]))
        y = _clip(builder, y, splat_value(builder, _F32X16, lo_a), splat_value(builder, _F32X16, hi_a))
        builder.store(y, element_ptr(context, builder, sig.args[0], out_a, sig.args[1], oi_a, _F32X16), align=4)
        return context.get_dummy_value()

    return types.none(out, oi, acc, scale, bias, col, lo, hi), codegen


@intrinsic
def store_codes(typingctx, out8, oi, acc, scale, bias, col, step, qlo, qhi, shift):
    """16 lanes as the next conv's input codes, ``out8[oi + l] = rint(clip(y / step, qlo, qhi)) - shift`` with
    ``y = float32(acc[l]) * scale[col + l] + bias[col + l]``: ``store_floats``' value quantized as
    ``conv_nhwc._pad_codes`` would, with the clamp folded into ``qlo, qhi`` (``gemm_avx2.codes_bounds``).
    Returns the codes before the shift as ``i32x16`` (the caller sums them per pixel); the shift is subtracted
    from the bytes (modulo 256, so the same bytes)."""
    f32 = types.Array(types.float32, 1, "C")
    if not (out8 == types.Array(types.int8, 1, "C") and scale == bias == f32 and acc in (i16x16, i32x16)
            and isinstance(oi, types.Integer) and isinstance(col, types.Integer)
            and step == qlo == qhi == types.float32 and isinstance(shift, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        out_a, oi_a, acc_a, scale_a, bias_a, col_a, step_a, qlo_a, qhi_a, shift_a = args
        y = _scaled(context, builder, (acc_a, sig.args[2]), (scale_a, sig.args[3]), (bias_a, sig.args[4]),
                    (col_a, sig.args[5]))
        y = builder.fdiv(y, splat_value(builder, _F32X16, step_a))
        y = _clip(builder, y, splat_value(builder, _F32X16, qlo_a), splat_value(builder, _F32X16, qhi_a))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X16, [_F32X16]), "llvm.rint.v16f32")
        codes = builder.fptosi(builder.call(rint, [y]), _I32X16)
        i8x16 = ir.VectorType(ir.IntType(8), LANES)
        byte = builder.trunc(context.cast(builder, shift_a, sig.args[9], types.int32), ir.IntType(8))
        builder.store(builder.sub(builder.trunc(codes, i8x16), splat_value(builder, i8x16, byte)),
                      element_ptr(context, builder, sig.args[0], out_a, sig.args[1], oi_a, i8x16), align=1)
        return codes

    return i32x16(out8, oi, acc, scale, bias, col, step, qlo, qhi, shift), codegen


for _name, _obj in list(globals().items()):
    if isinstance(_obj, _Intrinsic):
        pin_uuid(_obj, f"simd_dw.{_name}")
