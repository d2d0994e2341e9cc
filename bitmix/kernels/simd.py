"""x86 SIMD intrinsics for the Numba kernels, and the helpers that keep their disk cache effective.

Numba has no SIMD vector type and LLVM 22 never emits ``vpmaddubsw`` or ``vpdpbusd``
from scalar loops, so this module gives Numba opaque vector types backed by LLVM
``<n x iK>`` values plus ``@intrinsic`` functions that call the x86 intrinsics.
LLVM keeps these values in registers after inlining (checked with ``inspect_asm``).
Which path may use which intrinsics is decided in ``cpu`` and ``routing``.

Every Numba kernel module imports this one (or ``threads``) first, so the threading layer
is chosen before any parallel kernel compiles or loads from the cache.
"""

from __future__ import annotations

from types import FunctionType

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import _Intrinsic
from numba.extending import intrinsic, models, register_model

from bitmix.kernels import threads

threads.configure_threading()


def cache_variant(func: FunctionType, tag: str, **callees: object) -> FunctionType:
    """A copy of ``func`` with its own Numba disk-cache entry (qualified name + ``_tag``), seeing
    ``callees`` (other kernels it calls) as globals.

    Numba keys cached machine code by qualified name, signature, CPU and closure, not by
    flags such as ``parallel``: compiling one function both serially and with ``prange``
    lets whichever variant was cached first answer for both. Measured: the "parallel" AMX
    engine loaded the serial code and ran a 1x1 conv in 0.16 ms instead of 0.066 ms.

    Kernels a kernel calls must be ``callees``, never closure cells: the key pickles the cells, and a
    dispatcher pickles differently once it is compiled in the process (an llvmlite type its intrinsics
    reach caches its ``str``), so the kernel was saved under one key and looked up under another --
    recompiled in every process. Globals are not in the key: ``tag`` must name every such binding.
    """
    scope = {**func.__globals__, **callees} if callees else func.__globals__
    copy = FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    copy.__qualname__ = f"{func.__qualname__}_{tag}"
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    return copy


def pin_uuid(obj, tag: str):
    """Give a Numba dispatcher or intrinsic a fixed identity.

    Numba keys the on-disk cache of a closure by pickling its captured values; dispatchers
    and intrinsics pickle with a random per-process uuid, which would make every run a cache
    miss. A deterministic uuid (unique per tag) keeps ``cache=True`` effective.
    """
    obj._set_uuid(f"bitmix.kernels:{tag}")
    return obj


def pin_kernels(prefix: str, *funcs):
    """``pin_uuid`` each generated kernel as ``prefix.<its name>``; returns them."""
    for f in funcs:
        pin_uuid(f, f"{prefix}.{f.py_func.__name__}")
    return funcs


class VecType(types.Type):
    """An LLVM integer vector living in a SIMD register (never stored in arrays)."""

    def __init__(self, bits: int, lanes: int) -> None:
        self.bits = bits
        self.lanes = lanes
        super().__init__(name=f"i{bits}x{lanes}")


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: VecType) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(fe_type.bits), fe_type.lanes))


i8x32 = VecType(8, 32)
i16x16 = VecType(16, 16)
i32x8 = VecType(32, 8)
i8x64 = VecType(8, 64)
i32x16 = VecType(32, 16)


def _llty(vt: VecType) -> ir.VectorType:
    return ir.VectorType(ir.IntType(vt.bits), vt.lanes)


def _splat(vt: VecType, value: int) -> ir.Constant:
    return ir.Constant(_llty(vt), [value] * vt.lanes)


def _call(builder, name: str, ret: VecType, args, argtys) -> ir.Value:
    fnty = ir.FunctionType(_llty(ret), [_llty(t) for t in argtys])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def element_ptr(context, builder, arr_type, arr, idx_type, idx, vty: ir.Type) -> ir.Value:
    """A `vty *` pointing at element `idx` of a 1-D Numba array: the address of a vector load or store there."""
    ary = context.make_array(arr_type)(context, builder, value=arr)
    pos = context.cast(builder, idx, idx_type, types.intp)
    return builder.bitcast(builder.gep(ary.data, [pos]), vty.as_pointer())


def splat_value(builder, vty: ir.VectorType, value: ir.Value) -> ir.Value:
    """`value` (a scalar of `vty`'s element type) in every lane of `vty`."""
    vec = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _make_load(vt: VecType):
    @intrinsic
    def load(typingctx, arr, idx):
        """Unaligned load of ``vt.lanes`` bytes from a 1-D int8/uint8 array at byte ``idx``."""
        if not (isinstance(arr, types.Array) and arr.dtype.bitwidth == 8 and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            pos = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = builder.gep(ary.data, [pos])
            vptr = builder.bitcast(ptr, _llty(vt).as_pointer())
            return builder.load(vptr, align=1)

        return vt(arr, idx), codegen

    return load


load_i8x32 = _make_load(i8x32)
load_i8x64 = _make_load(i8x64)


@intrinsic
def prefetch(typingctx, arr, idx):
    """``prefetcht1`` (into L2: on cold int4/int2 GEMV 0.32 ms vs 0.35 ms for t0) of the cache line
    holding byte ``idx`` of a 1-D 8-bit array (never faults)."""
    if not (isinstance(arr, types.Array) and arr.dtype.bitwidth == 8 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [pos]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


def _make_unpack(vt: VecType):
    @intrinsic
    def unpack(typingctx, v, shift, mask):
        """``(v >> shift) & mask`` per unsigned byte: one bit-plane of a packed vector."""
        if v != vt or not isinstance(shift, types.Integer) or not isinstance(mask, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            lane = ir.IntType(8)
            s = builder.trunc(args[1], lane) if args[1].type.width > 8 else args[1]
            m = builder.trunc(args[2], lane) if args[2].type.width > 8 else args[2]
            undef = ir.Constant(_llty(vt), ir.Undefined)
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), None)
            sv = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0)), undef, zeros)
            mv = builder.shuffle_vector(builder.insert_element(undef, m, ir.Constant(ir.IntType(32), 0)), undef, zeros)
            return builder.and_(builder.lshr(args[0], sv), mv)

        return vt(v, shift, mask), codegen

    return unpack


unpack_i8x32 = _make_unpack(i8x32)
unpack_i8x64 = _make_unpack(i8x64)


def _make_zero(vt: VecType):
    @intrinsic
    def zero(typingctx):
        """An all-zero vector (accumulator initialiser)."""

        def codegen(context, builder, sig, args):
            return ir.Constant(_llty(vt), None)

        return vt(), codegen

    return zero


zero_i8x32 = _make_zero(i8x32)
zero_i16x16 = _make_zero(i16x16)
zero_i32x8 = _make_zero(i32x8)
zero_i32x16 = _make_zero(i32x16)


def _make_add(vt: VecType):
    @intrinsic
    def add(typingctx, a, b):
        """Lane-wise wrapping add."""
        if a != vt or b != vt:
            return None

        def codegen(context, builder, sig, args):
            return builder.add(args[0], args[1])

        return vt(a, b), codegen

    return add


add_i16x16 = _make_add(i16x16)
add_i32x8 = _make_add(i32x8)
add_i32x16 = _make_add(i32x16)


@intrinsic
def maddubs(typingctx, u, s):
    """``vpmaddubsw``: u8 x s8, adjacent pairs summed to s16 with saturation.

    Callers guarantee |pair sum| <= 32767 (weights <= 15 unsigned), so it never saturates.
    """
    if u != i8x32 or s != i8x32:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16x16, args, (i8x32, i8x32))

    return i16x16(u, s), codegen


@intrinsic
def madd_ones(typingctx, v):
    """``vpmaddwd`` with ones: adjacent s16 pairs widened and summed to s32 (exact)."""
    if v != i16x16:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, (args[0], _splat(i16x16, 1)), (i16x16, i16x16))

    return i32x8(v), codegen


@intrinsic
def madd_s8(typingctx, a, b):
    """Exact s8 x s8 dot step: sign-extend both 32-byte vectors to s16, two ``vpmaddwd``.

    Returns s32 lanes holding the sums of all 32 products; used for 8-bit weights, where
    ``vpmaddubsw`` could saturate.
    """
    if a != i8x32 or b != i8x32:
        return None

    def codegen(context, builder, sig, args):
        i16v = ir.VectorType(ir.IntType(16), 16)
        halves = []
        for lo in (0, 16):
            idx = ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(lo, lo + 16)))
            pa = builder.sext(builder.shuffle_vector(args[0], args[0], idx), i16v)
            pb = builder.sext(builder.shuffle_vector(args[1], args[1], idx), i16v)
            halves.append(_call(builder, "llvm.x86.avx2.pmadd.wd", i32x8, (pa, pb), (i16x16, i16x16)))
        return builder.add(halves[0], halves[1])

    return i32x8(a, b), codegen


@intrinsic
def dpbusd512(typingctx, acc, u, s):
    """``vpdpbusd zmm``: acc += sum of 4 adjacent u8 x s8 products per s32 lane (no saturation)."""
    if acc != i32x16 or u != i8x64 or s != i8x64:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", i32x16, args, (i32x16, i8x64, i8x64))

    return i32x16(acc, u, s), codegen


@intrinsic
def widen_i8x32(typingctx, lo, hi):
    """Concatenate two 32-byte vectors into one 64-byte vector (``vinserti64x4``)."""
    if lo != i8x32 or hi != i8x32:
        return None

    def codegen(context, builder, sig, args):
        idx = ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(64)))
        return builder.shuffle_vector(args[0], args[1], idx)

    return i8x64(lo, hi), codegen


@intrinsic
def flip_sign_i8x64(typingctx, v):
    """``v ^ 0x80`` per byte: reinterprets s8 ``x`` as the u8 ``x + 128``."""
    if v != i8x64:
        return None

    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _splat(i8x64, 0x80))

    return i8x64(v), codegen


@intrinsic
def bcast4_i8x64(typingctx, arr, idx):
    """The 4 bytes at byte ``idx`` of a 1-D int8/uint8 array, repeated 16 times (``vpbroadcastd``)."""
    if not (isinstance(arr, types.Array) and arr.dtype.bitwidth == 8 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        word = builder.load(builder.bitcast(builder.gep(ary.data, [pos]), ir.IntType(32).as_pointer()), align=1)
        vec = builder.insert_element(ir.Constant(_llty(i32x16), None), word, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
        return builder.bitcast(splat, _llty(i8x64))

    return i8x64(arr, idx), codegen


@intrinsic
def splat_i32x16(typingctx, value):
    """``value`` (any integer, truncated to 32 bits) in all 16 lanes."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        word = context.cast(builder, args[0], sig.args[0], types.int32)
        vec = builder.insert_element(ir.Constant(_llty(i32x16), None), word, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))

    return i32x16(value), codegen


@intrinsic
def load_i32x16(typingctx, arr, idx):
    """Unaligned load of 16 int32 from a 1-D int32 array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(builder.bitcast(builder.gep(ary.data, [pos]), _llty(i32x16).as_pointer()), align=4)

    return i32x16(arr, idx), codegen


@intrinsic
def store_i32x16(typingctx, arr, idx, v):
    """Unaligned store of 16 int32 lanes into a 1-D int32 array at element ``idx``."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and isinstance(idx, types.Integer)
            and v == i32x16):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        pos = context.cast(builder, args[1], sig.args[1], types.intp)
        builder.store(args[2], builder.bitcast(builder.gep(ary.data, [pos]), _llty(i32x16).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


def _make_hsum(vt: VecType):
    @intrinsic
    def hsum(typingctx, v):
        """Sum of all s32 lanes, widened to int64; exact because ``k_pad`` bounds the total below 2^31."""
        if v != vt:
            return None

        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.IntType(32), [args[0].type])
            name = f"llvm.vector.reduce.add.v{vt.lanes}i32"
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.sext(builder.call(fn, [args[0]]), ir.IntType(64))

        return types.int64(v), codegen

    return hsum


hsum_i32x8 = _make_hsum(i32x8)
hsum_i32x16 = _make_hsum(i32x16)


def _pin_intrinsics(namespace: dict) -> None:
    """Pin every intrinsic defined here (kernels capture them, so their identity is in cache keys)."""
    for name, obj in list(namespace.items()):
        if isinstance(obj, _Intrinsic):
            pin_uuid(obj, f"simd.{name}")


_pin_intrinsics(globals())
