"""lower: a fake-quantized prepared model -> `CompiledModel` running on the packed kernels.

Every quantized `QuantLayer` is swapped for a `KernelLayer` that calls a registered torch
custom op (`bitmix::qlinear`, `bitmix::qconv2d`, `bitmix::qmatmul`). The op quantizes its
input with the learned LSQ step (same float32 division and round-half-even as the
fake-quant forward), runs the Numba kernel on packed weight codes with int32
accumulation, and rescales `acc * (a_step * w_scale) + bias`. Each op has a fake
implementation, so a `CompiledModel` can itself be exported.

Each call also records the layer, the shapes it ran at and its precision, so
`CompiledModel.simulate()` prices what was executed (batch size, sequence length) rather
than what was traced.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import threading
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType

import numpy as np
import torch
from torch import fx, nn

from bitmix import kernels
from bitmix.compiler.hadamard import rotate_input
from bitmix.compiler.layout import channels_last_between_convs, code_chains, fuse_epilogues, nhwc_max_pools
from bitmix.compiler.qlayer import (
    MIN_STEP,
    LSQQuantizer,
    QuantLayer,
    layer_input_error,
    quant_layers,
    row_max,
)
from bitmix.compiler.torch_threads import torch_on_one_thread as torch_on_one_thread  # re-exported
from bitmix.errors import BitmixError
from bitmix.ir.graph import Layer, LayerGraph, VectorOp
from bitmix.ir.precision import Precision, as_precision
from bitmix.kernels.pack import code_range
from bitmix.kernels.padded import PaddedCodes


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """Everything one lowered layer needs at run time: packed codes, steps, scales, geometry."""

    name: str
    kind: str
    bits: Precision  # weight width packs the codes; activation width quantizes the inputs
    a_step: float
    a_signed: bool
    out_features: int = 0
    packed: kernels.PackedWeight | None = None
    w_scales: np.ndarray | None = None
    bias: np.ndarray | None = None
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    b_step: float = 1.0
    b_signed: bool = True
    a_scale: torch.Tensor | None = None  # per-input-channel multiplier before quantization (smoothing)
    rotation_signs: torch.Tensor | None = None  # online input rotation before that (`bitmix.compiler.rotate`)
    a_axis: int | None = None  # per-row activation steps (`bitmix.ir.row_steps`): a_step times the max along it
    b_axis: int | None = None
    a_shift: torch.Tensor | None = None  # a mid-rise input grid's half step, subtracted before the kernel

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", as_precision(self.bits))


_PLANS: weakref.WeakValueDictionary[int, KernelPlan] = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def _register(plan: KernelPlan) -> int:
    """A handle the custom ops can carry; the registry holds the plan weakly, its ``KernelLayer`` owns it."""
    handle = next(_NEXT)
    _PLANS[handle] = plan
    return handle


def _plan(handle: int) -> KernelPlan:
    plan = _PLANS.get(handle)
    if plan is None:
        raise BitmixError(f"no lowered layer with handle {handle}: the compiled model that owned it was freed; "
                          "keep it alive while its exported programs run, or re-run bitmix.compile")
    return plan


F32_EXACT = 1 << 24  # float32 holds every integer of magnitude <= 2^24, so integer sums below it are exact
_LINEARS: weakref.WeakKeyDictionary[KernelPlan, kernels.LinearKernel] = weakref.WeakKeyDictionary()


def linear_kernel(p: KernelPlan) -> kernels.LinearKernel:
    """The plan's ``kernels.LinearKernel`` (operands validated and laid out once), built at its first call.

    The smoothing factor goes in with the weights: the kernel multiplies by it in float32, the
    same product as QuantLayer's, so the codes match bit for bit. So does the input rotation
    (``kernels.hadamard``, the same float32 butterflies as ``rotate_input``), except before a mid-rise
    shift, which ``_run_linear`` applies between the two.
    """
    kernel = _LINEARS.get(p)
    if kernel is None:
        assert p.packed is not None and p.w_scales is not None
        a_scale = None if p.a_scale is None or p.a_shift is not None else p.a_scale.numpy()
        row_floor = None if p.a_axis is None else MIN_STEP  # per-row steps: `row_steps_of`'s floor
        rotation = None if p.rotation_signs is None or p.a_shift is not None else p.rotation_signs.numpy()
        kernel = kernels.prepare_linear(p.packed, p.w_scales, p.a_step, p.bits.a, p.a_signed, p.bias, a_scale,
                                        row_floor, rotation)
        _LINEARS[p] = kernel
    return kernel


def row_steps_of(v: torch.Tensor, step: float, axis: int) -> torch.Tensor:
    """`LSQQuantizer.step_for` of a per-row quantizer with this step: the same float32 product."""
    return torch.tensor(step, dtype=torch.float32) * row_max(v, axis)


def _run_linear(x: torch.Tensor, p: KernelPlan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The lowered linear; ``residual``: the add after it (``layout.fuse_epilogues``), done by the kernel."""
    x = _cpu_f32(x)
    if p.a_shift is not None:
        if p.rotation_signs is not None:
            x = rotate_input(x, p.rotation_signs)
        x = mid_rise_input(x, p.a_scale, p.a_shift)
    res = None if residual is None else _cpu_f32(residual).numpy()
    return torch.from_numpy(linear_kernel(p)(x.numpy(), res))


def mid_rise_input(x: torch.Tensor, a_scale: torch.Tensor | None, half_step: torch.Tensor) -> torch.Tensor:
    """What a mid-rise linear's kernel quantizes on the plain grid: `QuantLayer.prepare_input`'s smoothing
    product, minus the half step (`LSQQuantizer.codes`), in the same float32 ops."""
    if a_scale is not None:
        x = x * a_scale
    return x - half_step


def _qlinear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _run_linear(x, _plan(handle))


qlinear_op = torch.library.custom_op("bitmix::qlinear", mutates_args=())(_qlinear)


@qlinear_op.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _plan(handle).out_features))


def _run_conv2d(x: torch.Tensor, p: KernelPlan) -> torch.Tensor:
    assert p.packed is not None and p.w_scales is not None
    y = kernels.qconv2d(_np(x), p.packed, p.w_scales, p.a_step, p.bits.a, p.a_signed, p.bias, p.kernel_size,
                        p.stride, p.padding, p.dilation, p.groups)
    return torch.from_numpy(y)


def _run_conv2d_nhwc(x: torch.Tensor | PaddedCodes, p: KernelPlan, residual: torch.Tensor | None = None,
                     clamp: tuple[float, float] | None = None, codes_for: KernelPlan | None = None,
                     floats_too: bool = False) -> torch.Tensor | PaddedCodes | tuple:
    """``_run_conv2d`` with a ``channels_last`` result, reading a ``channels_last`` input without a
    copy (``kernels.qconv2d_nhwc``): the eager path of layers whose consumers lowering checked.
    ``residual``/``clamp``: the add and ReLU/hardtanh after it (``layout.fuse_epilogues``),
    done in the kernel's epilogue. ``codes_for``: the conv this one's result feeds, which
    then gets its input codes instead of floats where the kernels can (``layout.code_chains``);
    ``floats_too``: other ops read the result too, so the call returns ``(floats, that conv's input)``."""
    return _nhwc_call(x, residual, clamp, _nhwc_bound(p, clamp, codes_for, floats_too))


def _nhwc_bound(p: KernelPlan, clamp: tuple[float, float] | None, codes_for: KernelPlan | None,
                floats_too: bool = False) -> tuple:
    """``_nhwc_call``'s constants for a layer: its ``PreparedConv``, the next conv's (``codes_for``), the clamp
    as float32 bounds and ``floats_too``. A ``KernelLayer`` keeps them (``_bound``): three lookups a call less."""
    bounds = NO_CLAMP if clamp is None else (np.float32(clamp[0]), np.float32(clamp[1]))
    return p, _prepared(p), None if codes_for is None else _prepared(codes_for), bounds, floats_too


def _nhwc_call(x: torch.Tensor | PaddedCodes, residual: torch.Tensor | None, clamp: tuple[float, float] | None,
               bound: tuple) -> torch.Tensor | PaddedCodes | tuple:
    """``_run_conv2d_nhwc`` with its constants from ``_nhwc_bound``."""
    p, run, nxt, bounds, floats_too = bound
    if type(x) is PaddedCodes:
        channels_last, arr = True, x
    else:
        if x.dim() != 4:
            y = conv_epilogue(_run_conv2d(x, p), residual, clamp)
            return (y, y) if floats_too else y
        x = _cpu_f32(x)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        arr = x.numpy().transpose(0, 2, 3, 1) if channels_last else _np(x)
    res = None if residual is None else np.ascontiguousarray(_cpu_f32(residual).numpy().transpose(0, 2, 3, 1))
    if floats_too:
        y, codes = run.run_both(arr, channels_last, res, bounds, nxt)
        floats = torch.from_numpy(y.transpose(0, 3, 1, 2))
        return floats, floats if codes is None else codes
    out = run.run(arr, channels_last, res, bounds, nxt)
    return out if type(out) is PaddedCodes else torch.from_numpy(out.transpose(0, 3, 1, 2))


NO_CLAMP = (np.float32(-np.inf), np.float32(np.inf))


def _cpu_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float32 CPU tensor without autograd history, copied only where it is not one."""
    if x.requires_grad:
        x = x.detach()
    return x if x.dtype is torch.float32 and x.is_cpu else x.to("cpu", torch.float32)


def _prepared(p: KernelPlan):
    """The plan's ``PreparedConv``, built at its first call."""
    run = _PREPARED.get(p)
    if run is None:
        from bitmix.kernels.conv_prepared import PreparedConv  # loads Numba: only once a conv runs

        assert p.packed is not None and p.w_scales is not None
        run = _PREPARED[p] = PreparedConv(p.packed, p.w_scales, p.a_step, p.bits.a, p.a_signed, p.bias,
                                          p.kernel_size, p.stride, p.padding, p.dilation, p.groups)
    return run


def conv_epilogue(y: torch.Tensor, residual: torch.Tensor | None, clamp: tuple[float, float] | None) -> torch.Tensor:
    """The fused epilogue's ops as torch ops (traced graphs, non-4-D inputs): ``clamp(y + residual)``."""
    if residual is not None:
        y = y + residual
    if clamp is not None:
        lo, hi = clamp
        y = torch.clamp(y, None if lo == -math.inf else lo, None if hi == math.inf else hi)
    return y


_PREPARED: weakref.WeakKeyDictionary[KernelPlan, object] = weakref.WeakKeyDictionary()  # plan -> PreparedConv


def _qconv2d(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _run_conv2d(x, _plan(handle))


qconv2d_op = torch.library.custom_op("bitmix::qconv2d", mutates_args=())(_qconv2d)


@qconv2d_op.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    p = _plan(handle)
    ho, wo = (
        (size + 2 * pad - dil * (k - 1) - 1) // s + 1
        for size, k, s, pad, dil in zip(x.shape[2:], p.kernel_size, p.stride, p.padding, p.dilation, strict=True)
    )
    return x.new_empty((x.shape[0], p.out_features, ho, wo))


def _run_matmul(a: torch.Tensor, b: torch.Tensor, p: KernelPlan) -> torch.Tensor:
    """Attention's activation x activation products. When every partial sum of the integer product
    stays within float32's exact integers (``K * max|a code| * max|b code| <= 2^24``: MiniLM's
    QK^T and PV at 8 bits up to 258 keys), ``kernels.code_matmul`` forms both operands' codes and
    their product on float32 units in one call, which *is* the exact int32 product summed in any
    order; otherwise, and below 2-D, ``matmul_kernel``. Same codes and scaling either way. Per-row
    steps: each row of ``a`` and column of ``b`` at its own step, the product scaled by
    ``a_rows * b_cols`` as the fake-quant layer. The plan's constants come from ``matmul_bound``."""
    max_k, row_steps, floor, a_range, b_range = matmul_bound(p)
    if a.dim() >= 2 and b.dim() >= 2 and a.shape[-1] <= max_k:
        out, nan = _code_matmul_module().code_matmul(_cpu_f32(a).numpy(), _cpu_f32(b).numpy(), p.a_step, p.b_step,
                                                     floor, a_range, b_range)
        if nan:
            raise BitmixError("x: contains NaN or Inf (a row's step from its max); cannot quantize" if row_steps
                              else "x: contains NaN; cannot quantize")
        return torch.from_numpy(out)
    if row_steps:
        from bitmix.kernels.row_steps import divide_rows  # loads Numba: only once needed

        a_scaled, a_rows = divide_rows(_np(a), p.a_step, MIN_STEP)
        bt_scaled, b_cols = divide_rows(_np(b.transpose(-1, -2)), p.b_step, MIN_STEP)
        unit = _UNIT_STEPS.get(p)
        if unit is None:
            unit = _UNIT_STEPS[p] = replace(p, a_step=1.0, b_step=1.0, a_axis=None, b_axis=None)
        out = _run_matmul(torch.from_numpy(a_scaled), torch.from_numpy(bt_scaled).transpose(-1, -2), unit)
        return out * (torch.from_numpy(a_rows) * torch.from_numpy(b_cols).transpose(-1, -2))
    return torch.from_numpy(matmul_kernel(_np(a), _np(b), p))


@functools.cache
def _code_matmul_module() -> ModuleType:
    """``bitmix.kernels.code_matmul``, imported at the first matmul (it loads Numba); an import statement in
    ``_run_matmul`` cost 2.3 us a call."""
    from bitmix.kernels import code_matmul

    return code_matmul


_UNIT_STEPS: weakref.WeakKeyDictionary[KernelPlan, KernelPlan] = weakref.WeakKeyDictionary()  # plan at steps 1
_MATMULS: weakref.WeakKeyDictionary[KernelPlan, tuple] = weakref.WeakKeyDictionary()  # plan -> matmul_bound's


def matmul_bound(p: KernelPlan) -> tuple[int, bool, float | None, tuple[int, int], tuple[int, int]]:
    """A matmul plan's per-call constants, derived at its first call (each call re-derived them: ~5 us of
    MiniLM's ~110 us products): the largest K whose products stay exact on float32 units, whether the steps
    are per row, the row steps' floor (None: per-tensor) and both operands' code ranges."""
    bound = _MATMULS.get(p)
    if bound is None:
        row_steps = p.a_axis is not None and p.b_axis is not None
        if row_steps:
            assert p.a_axis == -1 and p.b_axis == -2, "row steps run along the contraction dimension"
        max_k = F32_EXACT // (_max_code(p.bits.a, p.a_signed) * _max_code(p.bits.a, p.b_signed))
        bound = _MATMULS[p] = (max_k, row_steps, MIN_STEP if row_steps else None,
                               code_range(p.bits.a, p.a_signed), code_range(p.bits.a, p.b_signed))
    return bound


def _max_code(bits: int, signed: bool) -> int:
    """Largest code magnitude of a ``bits``-wide activation (``kernels.pack.code_range``)."""
    return 1 << (bits - 1) if signed else (1 << bits) - 1


def _qmatmul(a: torch.Tensor, b: torch.Tensor, handle: int) -> torch.Tensor:
    return _run_matmul(a, b, _plan(handle))


qmatmul_op = torch.library.custom_op("bitmix::qmatmul", mutates_args=())(_qmatmul)


@qmatmul_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.matmul(a, b)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def matmul_kernel(a: np.ndarray, b: np.ndarray, p: KernelPlan) -> np.ndarray:
    """Activation x activation matmul on both operands' codes (``kernels.bmm``: nothing to pack,
    since both change every call), scaled by the two step sizes."""
    a_codes = kernels.quantize_activations(a, p.a_step, p.bits.a, p.a_signed)
    b_codes = kernels.quantize_activations(b, p.b_step, p.bits.a, p.b_signed)
    batch = np.broadcast_shapes(a_codes.shape[:-2], b_codes.shape[:-2])
    acc = kernels.bmm(_over_batch(a_codes, batch), _over_batch(b_codes, batch))
    scale = np.float32(p.a_step) * np.float32(p.b_step)
    return (acc.astype(np.float32) * scale).reshape(*batch, acc.shape[1], acc.shape[2])


def _over_batch(codes: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """``codes`` as (prod(batch), rows, cols), broadcast only where its batch differs: ``np.broadcast_to``'s view is
    read-only, which ``kernels.bmm`` copies (a read-only array is a kernel signature of its own)."""
    if codes.shape[:-2] != batch:
        codes = np.broadcast_to(codes, (*batch, *codes.shape[-2:]))
    return codes.reshape(-1, *codes.shape[-2:])


NO_GRADIENT = ("bitmix: the compiled model got inputs that require grad, but its kernels have no autograd: no gradient "
               "flows back through it (run inference under torch.no_grad(); train the model itself, or cm.fake_quant)")


def warn_without_autograd(owner: object, tensors: Iterable[object]) -> None:
    """Once per compiled model (``owner``): inputs that require grad get no gradient back from the kernels, so a
    compiled block inside a trained model silently dropped its path from ``backward()``."""
    if (torch.is_grad_enabled() and not getattr(owner, "_warned_no_gradient", False)
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)):
        owner._warned_no_gradient = True  # type: ignore[attr-defined]
        warnings.warn(NO_GRADIENT, stacklevel=3)


def _plain_tensors(x: object, other: object = None, residual: object = None) -> bool:
    """Real tensors and no tracer: call the op's implementation directly.

    The ``torch.library`` dispatch around a custom op costs ~80 us a call here (MiniLM makes
    48 calls per forward); tracers see fake or proxy tensors (non-strict ``torch.export``) or
    trace under Dynamo and still get the op, so exported graphs keep ``bitmix::q*`` nodes.
    Not ``torch.compiler.is_compiling()``: ``torch.export`` sets that flag for the whole process,
    so a model served from another thread meanwhile would switch route mid-forward.
    """
    return (not torch.compiler.is_dynamo_compiling() and type(x) in _PLAIN
            and (other is None or type(other) in _PLAIN) and (residual is None or type(residual) in _PLAIN))


_PLAIN = (torch.Tensor, PaddedCodes)
_IMPLS = {"linear": (_run_linear, "qlinear"), "conv2d": (_run_conv2d, "qconv2d"), "matmul": (_run_matmul, "qmatmul")}


class CallRecorder:
    """Shapes each lowered layer actually ran at, in call order: one record per thread, so forwards running
    at once (a serving pool's threads) each keep their own pass and `cm.simulate()` prices the calling
    thread's last one (a shared record mixed the layers of several passes)."""

    def __init__(self, enabled: bool = True) -> None:
        self._local = threading.local()
        self.enabled = enabled

    @property
    def calls(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """This thread's record."""
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = []
        return calls

    @property
    def frames(self) -> int | None:
        """The batch of this thread's recorded pass (`bitmix.ir.graph.frames_of` its inputs)."""
        return getattr(self._local, "frames", None)

    @frames.setter
    def frames(self, value: int | None) -> None:
        self._local.frames = value

    def record(self, name: str, in_shape: tuple[int, ...], other: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        """Append one call, its shapes as plain tuples (``torch.Size`` converted here, only when recording)."""
        if self.enabled:
            self.calls.append((name, tuple(in_shape), tuple(other), tuple(out_shape)))

    def __getstate__(self) -> dict:  # a saved model keeps no record (nor the thread-local store)
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("enabled", True))


class KernelLayer(nn.Module):
    """Drop-in for a quantized `QuantLayer`: calls the bitmix custom op for its kind.

    The layer owns its plan (packed weights and all): they are freed with it. The custom ops
    reach the plan through ``handle``, which a copy or unpickled layer gets afresh.
    """

    def __init__(self, plan: KernelPlan, recorder: CallRecorder, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last  # eager conv results in channels_last format (``layout``)
        self.clamp: tuple[float, float] | None = None  # a fused ReLU/hardtanh after a conv (``layout``)
        self.codes_for: KernelPlan | None = None  # the conv fed input codes by this one (``layout.code_chains``)
        self.floats_too = False  # ... while other ops read its floats: it returns (floats, codes_for's input)
        self.name = plan.name
        self.kind = plan.kind
        self.bits = plan.bits
        self.plan = plan
        self.handle = _register(plan)
        self.recorder = recorder

    def __getstate__(self) -> dict:  # the bound constants are process-local (kernel plans): rebuilt on first call
        state = super().__getstate__()
        state.pop("_bound", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.handle = _register(self.plan)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, bits={self.bits}, handle={self.handle}"

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's op; for a conv or linear, ``residual`` is a fused add after it (``layout.fuse_epilogues``)."""
        assert (other is not None) == (self.kind == "matmul")
        try:
            if not _plain_tensors(x, other, residual):
                operands: tuple = (x,) if other is None else (x, other)
                out = getattr(torch.ops.bitmix, _IMPLS[self.kind][1])(*operands, self.handle)
                if residual is not None or self.clamp is not None:
                    out = conv_epilogue(out, residual, self.clamp)
                if self.__dict__.get("floats_too"):
                    out = (out, out)
            elif torch.autograd.profiler._is_profiler_enabled:  # profiles still name the op
                with torch.profiler.record_function(f"bitmix::{_IMPLS[self.kind][1]}"):
                    out = self._eager(x, other, residual)
            else:
                out = self._eager(x, other, residual)
        except BitmixError as exc:
            raise layer_input_error(self.name, exc) from None
        shape = out[0].shape if type(out) is tuple else out.shape
        self.recorder.record(self.name, x.shape, () if other is None else other.shape, shape)
        return out

    def _eager(self, x: torch.Tensor, other: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last:
            plan, codes_for, clamp, both = self.plan, self.codes_for, self.clamp, self.__dict__.get("floats_too", False)
            bound = self.__dict__.get("_bound")  # (plan, codes_for, clamp, floats_too it was bound for, _nhwc_bound's)
            if (bound is None or bound[0] is not plan or bound[1] is not codes_for or bound[2] is not clamp
                    or bound[3] is not both):
                bound = self.__dict__["_bound"] = (plan, codes_for, clamp, both,
                                                   _nhwc_bound(plan, clamp, codes_for, both))
            return _nhwc_call(x, residual, clamp, bound[4])
        if self.kind == "linear" and self.clamp is None:
            return _run_linear(x, self.plan, residual)
        impl = _IMPLS[self.kind][0]
        out = impl(x, self.plan) if other is None else impl(x, other, self.plan)
        return out if residual is None and self.clamp is None else conv_epilogue(out, residual, self.clamp)


def plan_for(layer: QuantLayer) -> KernelPlan:
    """Pack a fake-quantized layer's weight codes exactly as its forward pass rounds them."""
    bits = layer.bits
    if bits is None or layer.a_quant is None:
        raise BitmixError(f"layer {layer.name!r} has no precision; fake_quantize it before lowering")
    a_step = float(layer.a_quant.step.detach())
    if layer.kind == "matmul":
        assert layer.b_quant is not None
        return KernelPlan(layer.name, "matmul", bits, a_step, layer.a_quant.signed,
                          b_step=float(layer.b_quant.step.detach()), b_signed=layer.b_quant.signed,
                          a_axis=layer.a_quant.axis, b_axis=layer.b_quant.axis)
    assert layer.weight is not None and layer.w_quant is not None
    weight = layer.weight.detach().float()
    w_codes = layer.w_quant.codes(weight)  # not `weight_codes()`: its cache would keep a weight-sized copy
    codes = w_codes.reshape(weight.shape[0], -1).numpy().astype(np.int8)
    scales = layer.w_quant.step.detach().float().reshape(-1).expand(weight.shape[0]).numpy().copy()
    folded = layer.folded_bias(w_codes)
    del w_codes
    bias = folded.numpy().copy() if folded is not None else None
    half = layer.a_quant.half_step() if isinstance(layer.a_quant, LSQQuantizer) else None
    geometry = {}
    if layer.kind == "conv2d":
        geometry = dict(kernel_size=tuple(weight.shape[2:]), stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, groups=layer.groups)
    a_scale = layer.a_scale.detach().float().clone() if layer.a_scale is not None else None
    signs = layer.rotation_signs.detach().float().clone() if layer.rotation_signs is not None else None
    return KernelPlan(layer.name, layer.kind, bits, a_step, layer.a_quant.signed, out_features=weight.shape[0],
                      a_scale=a_scale, rotation_signs=signs, a_axis=layer.a_quant.axis, a_shift=half,
                      packed=kernels.pack_weights(codes, bits.w), w_scales=scales, bias=bias, **geometry)


@dataclass
class LoweredModule:
    module: nn.Module
    recorder: CallRecorder
    lowered: tuple[str, ...]
    float_layers: tuple[str, ...] = field(default_factory=tuple)


def lower(fake_quant_model: nn.Module) -> LoweredModule:
    """Swap every quantized QuantLayer of a copy of the model for a KernelLayer (the model is not changed).

    The copy shares the quantized QuantLayers until they are swapped out, so their float weights are never
    copied (one more copy of every weight at the peak of a large model's compile)."""
    quantized = [layer for layer in quant_layers(fake_quant_model).values() if layer.bits is not None]
    module = copy.deepcopy(fake_quant_model, {id(layer): layer for layer in quantized})
    recorder = CallRecorder()
    lowered, kept = [], []
    for name, layer in quant_layers(module).items():
        if layer.bits is None:
            kept.append(name)
            continue
        _set_submodule(module, _path_of(module, layer), KernelLayer(plan_for(layer), recorder))
        lowered.append(name)
    module.eval()
    if isinstance(module, fx.GraphModule):
        fuse_epilogues(module)
        nhwc_max_pools(module)
        channels_last_between_convs(module)
        code_chains(module)
    return LoweredModule(module, recorder, tuple(lowered), tuple(kept))


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for path, mod in root.named_modules():
        if mod is target:
            return path
    raise KeyError(target)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def executed_layers(graph: LayerGraph, calls: list[tuple], assignment: dict
                    ) -> tuple[list[Layer], list[VectorOp], dict]:
    """Layer records re-shaped to the calls actually executed, and their precisions, for the simulator.

    Layers keep the graph's order, which is the accelerator's schedule (the report's cost); the order
    the CPU ran them in can differ (a shortcut conv lowered before its block's second conv) and would
    price other producer hops and prefetch overlaps. MACs are recomputed from the run shapes; each vector
    op's work is scaled by how the layer it follows grew (the first layer's input for ops before any
    layer): it shares that layer's batch and sequence dimensions (a softmax grows as its matmul, T^2).
    """
    by_name = {layer.name: layer for layer in graph.layers}
    rank = {name: i for i, name in enumerate(by_name)}
    ordered = sorted(calls, key=lambda call: rank[call[0]])  # stable: repeated calls of a layer keep their order
    layers: list[Layer] = []
    bits: dict = {}
    growth: dict[str | None, float] = {}
    for name, in_shape, other, out_shape in ordered:
        layer = by_name[name]
        out = math.prod(out_shape)
        if layer.kind == "conv2d":
            macs = out * math.prod(layer.weight_shape[1:])
        else:
            macs = out * in_shape[-1]
        if name not in growth:
            growth[name] = out / max(1, layer.output_elements)
            if not layers:
                growth[None] = math.prod(in_shape) / max(1, layer.input_elements)
        carried = round(layer.crossing * math.prod(in_shape) / max(1, layer.input_elements))  # grows as its input
        layers.append(replace(layer, name=f"{name}@{len(layers)}" if _seen(layers, name) else name,
                              input_shape=in_shape, output_shape=out_shape, weight_shape=other or layer.weight_shape,
                              macs=macs, crossing=carried))
        bits[layers[-1].name] = assignment[name]
    vector_ops = [replace(op, elements=round(op.elements * growth.get(op.after, 1.0)),
                          input_elements=round(op.input_elements * growth.get(op.after, 1.0)))
                  for op in graph.vector_ops]
    return layers, vector_ops, bits


def _seen(layers: list[Layer], name: str) -> bool:
    return any(layer.name == name for layer in layers)
