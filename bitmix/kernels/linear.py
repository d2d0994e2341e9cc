"""``prepare_linear``: a quantized linear's constant operands validated and laid out once, for many calls.

``quant.qlinear`` checks every operand and derives the scales on each call, which is right for
a one-off product and costs tens of microseconds a call; a lowered layer calls the same weights
thousands of times. A ``LinearKernel`` does that work when it is built and then, per call, only
checks ``x``. On the VNNI, AVX2 and AMX engines with at least ``gemm_vnni.MIN_M`` rows a call is one fused
Numba kernel (``linear_vnni``, ``linear_avx2``, ``linear_amx``); with fewer rows (GEMV shapes) on every path but
the AMX engine, one fused GEMV kernel (``linear_gemv``); elsewhere (scalar GEMMs) it runs ``quant.qlinear``.
Outputs are bit-identical either way; with ``a_scale`` (a per-input-channel smoothing factor)
the input is first multiplied by it in float32, as the fake-quant forward does. With ``row_floor``
the activations have per-row steps (``bitmix.ir.row_steps``): row i's step is
``a_step * max(max_k |x[i, k]|, row_floor)``, and its output row is scaled by it after the GEMM.
With ``rotation`` (a Hadamard-rotated input's signs, ``bitmix.compiler.hadamard``) the input is first
rotated, ``hadamard(x * signs, b)`` with b the largest power of two dividing K: inside the fused
per-row-step kernels' quantize pass and the GEMV kernel, row by row, else by ``hadamard.rotate_rows``
before the rest. A separate pass cost MiniLM 35 calls and ~1.4 ms a forward (AMD EPYC, 2026-12-04).
"""

from __future__ import annotations

import numpy as np

from bitmix.errors import BitmixError
from bitmix.kernels import gemm_vnni
from bitmix.kernels.hadamard import rotate_rows
from bitmix.kernels.isa import isa_of
from bitmix.kernels.launch import _parallel
from bitmix.kernels.linear_amx import AmxLinear
from bitmix.kernels.linear_avx2 import Avx2Linear
from bitmix.kernels.linear_gemv import GemvLinear
from bitmix.kernels.linear_vnni import FusedLinear
from bitmix.kernels.matmul import check_activation_spec, check_packed
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.quant import _f32, _step, qlinear
from bitmix.kernels.routing import dispatch
from bitmix.kernels.row_steps import divide_rows, scale_rows
from bitmix.kernels.scratch import aligned_empty

_FUSED = {"avx512vnni": FusedLinear, "avx2": Avx2Linear, "amx": AmxLinear}  # engine -> its fused kernel


class LinearKernel:
    """``y = float32(gemm(codes(x * a_scale), w)) * (float32(a_step) * w_scales) + bias`` for (..., K) float32 ``x``."""

    def __init__(self, w: PackedWeight, w_scales: np.ndarray, a_step: float, a_bits: int, a_signed: bool,
                 bias: np.ndarray | None = None, a_scale: np.ndarray | None = None,
                 row_floor: float | None = None, rotation: np.ndarray | None = None) -> None:
        self.w = check_packed(w)
        self.rotation = None if rotation is None else np.ascontiguousarray(_f32(rotation, "rotation", (w.k,)))
        self.w_scales = np.ascontiguousarray(_f32(w_scales, "w_scales", (w.n,)))
        self.bias = None if bias is None else np.ascontiguousarray(_f32(bias, "bias", (w.n,)))
        self.a_scale = None if a_scale is None else np.ascontiguousarray(_f32(a_scale, "a_scale", (w.k,)))
        self.a_step = _step(a_step)
        self.row_floor = None if row_floor is None else _step(row_floor)
        self.a_bits, self.a_signed = a_bits, bool(a_signed)
        self.codes = check_activation_spec(a_bits, a_signed)
        self._fused: dict[str, FusedLinear | Avx2Linear | AmxLinear] = {}  # engine -> its kernel, built at first call
        self._gemv: GemvLinear | None = None  # the fused GEMV kernel (fewer than ``gemm_vnni.MIN_M`` rows)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The linear of ``x``; plus ``residual`` (float32, the output's shape) when given: the float32 add torch's
        ``y + residual`` makes, in the AVX2 GEMM's epilogue, else in place after the kernel."""
        w = self.w
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] != w.k:
            raise BitmixError(f"x: expected a float32 numpy array (..., {w.k}), got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        lead = x.shape[:-1]
        if residual is not None and (not isinstance(residual, np.ndarray) or residual.dtype != np.float32
                                     or residual.shape != (*lead, w.n)):
            raise BitmixError(f"residual: expected a float32 numpy array {(*lead, w.n)}, got "
                              f"{getattr(residual, 'dtype', type(residual).__name__)} {getattr(residual, 'shape', '')}")
        rows = np.ascontiguousarray(x).reshape(-1, w.k)
        m = rows.shape[0]
        if m == 0:  # an empty batch: nothing to quantize, as torch's linear
            return np.empty((*lead, w.n), dtype=np.float32)
        res = None if residual is None else np.ascontiguousarray(residual).reshape(m, w.n)
        settings = dispatch.settings
        engine = settings.engine(w, m, 1, fused=True)
        refusal = ("x: contains NaN; cannot quantize" if self.row_floor is None else
                   "x: contains NaN or Inf (a row's step from its max); cannot quantize")
        if m < gemm_vnni.MIN_M and engine != "amx":
            out = aligned_empty((m, w.n), np.float32)
            if self._gemv is None:
                self._gemv = GemvLinear(w, self.w_scales, self.a_step, *self.codes, self.bias, self.a_scale,
                                        self.row_floor, self.rotation)
            if self._gemv(rows, out, isa_of(settings.path), _parallel(settings, m * w.n * w.k_pad)):
                raise BitmixError(refusal)
            return _added(out, res).reshape(*lead, w.n)
        one_call = m >= gemm_vnni.MIN_M and engine in _FUSED
        if self.rotation is not None and not (one_call and self.row_floor is not None):
            rows = rotate_rows(rows, self.rotation, w.k & -w.k)
        if one_call:
            out = aligned_empty((m, w.n), np.float32)
            fused = self._fused.get(engine)
            if fused is None:
                fused = self._fused[engine] = _FUSED[engine](
                    w, self.w_scales, self.a_step, *self.codes, self.bias, self.a_scale, self.row_floor,
                    None if self.row_floor is None else self.rotation)
            parallel = _parallel(settings, m * w.n * w.k_pad)
            if engine == "avx2":
                if fused(rows, out, parallel, res):
                    raise BitmixError(refusal)
                return out.reshape(*lead, w.n)
            if fused(rows, out, parallel):
                raise BitmixError(refusal)
            return _added(out, res).reshape(*lead, w.n)
        if self.a_scale is not None:
            rows = rows * self.a_scale
        if self.row_floor is None:
            y = qlinear(rows, w, self.w_scales, self.a_step, self.a_bits, self.a_signed, self.bias)
        else:
            rows, steps = divide_rows(rows, self.a_step, self.row_floor)
            if not np.isfinite(steps).all():  # an infinite row max: its step, and so its codes, are NaN
                raise BitmixError(refusal)
            y = scale_rows(qlinear(rows, w, self.w_scales, 1.0, self.a_bits, self.a_signed, None), steps, self.bias)
        return _added(y, res).reshape(*lead, w.n)


def _added(y: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """``y + residual`` written into ``y`` (a fresh kernel output), or ``y``."""
    if residual is not None:
        np.add(y, residual, out=y)
    return y


def prepare_linear(w: PackedWeight, w_scales: np.ndarray, a_step: float, a_bits: int, a_signed: bool,
                   bias: np.ndarray | None = None, a_scale: np.ndarray | None = None,
                   row_floor: float | None = None, rotation: np.ndarray | None = None) -> LinearKernel:
    """A ``LinearKernel`` for these operands (validated here, once); see the module docstring."""
    return LinearKernel(w, w_scales, a_step, a_bits, a_signed, bias, a_scale, row_floor, rotation)
