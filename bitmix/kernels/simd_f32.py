"""Eight-lane float32 vectors for the Numba kernels: LLVM ``<8 x float>`` values, no ISA intrinsics.

Numba's loop vectoriser gives up on in-place butterflies (the loads and stores of one row may alias
as far as LLVM knows), so kernels that need float SIMD write it here explicitly. The operations are
plain LLVM IR (``fadd``, ``fsub``, ``fmul``, ``shufflevector``): LLVM lowers them to the host's
widest unit (one ymm register on AVX2 and AVX-512 machines), and each lane does exactly the float32
operation the scalar code would, so results are bit-identical to it.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic, models, register_model

from bitmix.kernels import simd


class F32Vec(types.Type):
    """An LLVM float32 vector living in a SIMD register (never stored in arrays)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"f32x{lanes}")


@register_model(F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: F32Vec) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))


f32x8 = F32Vec(8)
_F32X8 = ir.VectorType(ir.FloatType(), 8)


def _pointer(context, builder, sig, args) -> ir.Value:
    ary = context.make_array(sig.args[0])(context, builder, value=args[0])
    pos = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.bitcast(builder.gep(ary.data, [pos]), _F32X8.as_pointer())


def _is_f32_array(arr, idx) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and isinstance(idx, types.Integer)


@intrinsic
def load_f32x8(typingctx, arr, idx):
    """Unaligned load of 8 float32 from a 1-D float32 array at element ``idx``."""
    if not _is_f32_array(arr, idx):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig, args), align=4)

    return f32x8(arr, idx), codegen


@intrinsic
def store_f32x8(typingctx, arr, idx, v):
    """Unaligned store of 8 float32 lanes into a 1-D float32 array at element ``idx``."""
    if not (_is_f32_array(arr, idx) and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig, args), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


def _make_binary(op: str):
    @intrinsic
    def binary(typingctx, a, b):
        """Lane-wise float32 ``a <op> b`` (IEEE, round to nearest: the scalar operation per lane)."""
        if a != f32x8 or b != f32x8:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return f32x8(a, b), codegen

    return binary


add_f32x8 = _make_binary("fadd")
sub_f32x8 = _make_binary("fsub")
mul_f32x8 = _make_binary("fmul")
div_f32x8 = _make_binary("fdiv")


@intrinsic
def fma_f32x8(typingctx, a, b, c):
    """Lane-wise ``a * b + c`` rounded once (``llvm.fma``): the same as the two scalar operations wherever
    both are exact, as for products of integer codes summed below 2^24 (``code_matmul``)."""
    if a != f32x8 or b != f32x8 or c != f32x8:
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_F32X8, [_F32X8] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v8f32"), args)

    return f32x8(a, b, c), codegen


@intrinsic
def splat_f32x8(typingctx, x):
    """Eight lanes of the float32 scalar ``x``."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(_F32X8, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, one, _lanes([0] * 8))

    return f32x8(x), codegen


def _lanes(order: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(32), len(order)), order)


@intrinsic
def hadamard_f32x8(typingctx, v):
    """The butterfly stages h = 1, 2, 4 inside one vector: per stage, lane j (with bit h clear) becomes
    ``v[j] + v[j + h]`` and lane j + h ``v[j] - v[j + h]``, the scalar butterflies' operations, in registers."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        for h in (1, 2, 4):
            first = [j if j & h == 0 else j - h for j in range(8)]
            a = builder.shuffle_vector(x, x, _lanes(first))
            b = builder.shuffle_vector(x, x, _lanes([j + h for j in first]))
            x = builder.shuffle_vector(builder.fadd(a, b), builder.fsub(a, b),
                                       _lanes([j if j & h == 0 else 8 + j for j in range(8)]))
        return x

    return f32x8(v), codegen


_I32X8 = ir.VectorType(ir.IntType(32), 8)


@intrinsic
def abs_top_u32x8(typingctx, top, v):
    """Lane-wise ``max(top, bits(|v|))`` on the float bits with the sign cleared, compared unsigned: the eight-lane
    ``row_steps._top`` (unsigned order is the float order there, and a NaN, above +inf, wins)."""
    if top != simd.i32x8 or v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.and_(builder.bitcast(args[1], _I32X8), ir.Constant(_I32X8, [0x7FFFFFFF] * 8))
        return builder.select(builder.icmp_unsigned(">", bits, args[0]), bits, args[0])

    return simd.i32x8(top, v), codegen


@intrinsic
def hmax_u32x8(typingctx, v):
    """The largest lane of ``v`` read as uint32 (``abs_top_u32x8``'s reduction)."""
    if v != simd.i32x8:
        return None

    def codegen(context, builder, sig, args):
        return _reduce_i32x8(builder, "umax", args[0])

    return types.uint32(v), codegen


def _reduce_i32x8(builder, op: str, v: ir.Value) -> ir.Value:
    """LLVM's ``llvm.vector.reduce.<op>.v8i32`` of ``v``: one int32."""
    fnty = ir.FunctionType(ir.IntType(32), [_I32X8])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.{op}.v8i32"), [v])


def _rint_clip(builder, x: ir.Value, lo: ir.Value, hi: ir.Value) -> ir.Value:
    """``rint(min(max(x, lo), hi))`` per lane; a NaN lane gives ``lo``."""
    x = builder.select(builder.fcmp_ordered(">", x, lo), x, lo)
    x = builder.select(builder.fcmp_ordered("<", x, hi), x, hi)
    fnty = ir.FunctionType(_F32X8, [_F32X8])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.rint.v8f32"), [x])


@intrinsic
def rint_clip_f32x8(typingctx, v, lo, hi):
    """``rint(min(max(v, lo), hi))`` per lane (``lo``/``hi`` splat): the scalar float code formula. A NaN lane
    gives ``lo``; callers flag NaN apart (``nan_mask_f32x8``)."""
    if v != f32x8 or lo != f32x8 or hi != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return _rint_clip(builder, *args)

    return f32x8(v, lo, hi), codegen


@intrinsic
def codes_f32x8(typingctx, v, lo, hi, shift):
    """``int32(rint(min(max(v, lo), hi))) - shift`` per lane (``lo``/``hi`` splat, ``shift`` an int32): the
    scalar code formula. A NaN lane gives ``lo - shift`` (never LLVM's poison of a NaN conversion); callers
    flag NaN apart (``nan_mask_f32x8``)."""
    if v != f32x8 or lo != f32x8 or hi != f32x8 or shift != types.int32:
        return None

    def codegen(context, builder, sig, args):
        x = _rint_clip(builder, *args[:3])
        return builder.sub(builder.fptosi(x, _I32X8), simd.splat_value(builder, _I32X8, args[3]))

    return simd.i32x8(v, lo, hi, shift), codegen


@intrinsic
def nan_mask_f32x8(typingctx, seen, v):
    """``seen`` with every lane where ``v`` is NaN set to all ones (``any_i32x8`` tells if one was)."""
    if seen != simd.i32x8 or v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], builder.sext(builder.fcmp_unordered("uno", args[1], args[1]), _I32X8))

    return simd.i32x8(seen, v), codegen


@intrinsic
def any_i32x8(typingctx, v):
    """True if a lane of ``v`` is nonzero."""
    if v != simd.i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.icmp_unsigned("!=", _reduce_i32x8(builder, "or", args[0]), ir.Constant(ir.IntType(32), 0))

    return types.boolean(v), codegen


@intrinsic
def store_i8x8(typingctx, arr, idx, v):
    """The eight int32 lanes of ``v``, truncated to bytes (callers keep them in -128..127), into a 1-D int8
    array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int8 and isinstance(idx, types.Integer)
            and v == simd.i32x8):
        return None

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(ir.IntType(8), 8)
        ptr = simd.element_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], vty)
        builder.store(builder.trunc(args[2], vty), ptr, align=1)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


for _name, _obj in list(globals().items()):
    if isinstance(_obj, _Intrinsic):
        simd.pin_uuid(_obj, f"simd_f32.{_name}")
