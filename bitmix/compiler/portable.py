"""Custom ops that carry their packed weights as tensors, so a lowered model can leave the process.

The lowered model's ops (`bitmix::qlinear` etc. in `lower.py`) name their layer by a
process-local handle. For `cm.save` each `KernelLayer` becomes a `PortableLayer` whose
packed codes, row sums, scales and bias are buffers passed to `bitmix::qlinear_packed`,
`bitmix::qconv2d_packed` or `bitmix::qmatmul_steps`; `torch.export` stores them as
constants and any process that imports bitmix can run the program. The ops call the same
kernels with the same arguments as the lowered layers, so outputs are bit-identical.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from bitmix import kernels
from bitmix.compiler.hadamard import rotate_input
from bitmix.compiler.lower import KernelLayer, KernelPlan, conv_epilogue, matmul_kernel, row_steps_of
from bitmix.ir.precision import Precision


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _packed(data: torch.Tensor, row_sums: torch.Tensor, bits: int, k: int, k_pad: int, offset: int
            ) -> kernels.PackedWeight:
    return kernels.PackedWeight(data.numpy(), bits, data.shape[0], k, k_pad, offset, row_sums.numpy())


@torch.library.custom_op("bitmix::qlinear_packed", mutates_args=())
def qlinear_packed(x: torch.Tensor, data: torch.Tensor, row_sums: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, k: int, k_pad: int, offset: int, bits: int, a_bits: int,
                   a_step: float, a_signed: bool) -> torch.Tensor:
    w = _packed(data, row_sums, bits, k, k_pad, offset)
    b = bias.numpy() if bias is not None else None
    return torch.from_numpy(kernels.qlinear(_np(x), w, scales.numpy(), a_step, a_bits, a_signed, b))


@qlinear_packed.register_fake
def _(x, data, row_sums, scales, bias, k, k_pad, offset, bits, a_bits, a_step, a_signed):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], data.shape[0]))


@torch.library.custom_op("bitmix::qconv2d_packed", mutates_args=())
def qconv2d_packed(x: torch.Tensor, data: torch.Tensor, row_sums: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, k: int, k_pad: int, offset: int, bits: int, a_bits: int,
                   a_step: float, a_signed: bool, geometry: list[int]) -> torch.Tensor:
    w = _packed(data, row_sums, bits, k, k_pad, offset)
    b = bias.numpy() if bias is not None else None
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    y = kernels.qconv2d(_np(x), w, scales.numpy(), a_step, a_bits, a_signed, b, (kh, kw), (sh, sw), (ph, pw),
                        (dh, dw), groups)
    return torch.from_numpy(y)


@qconv2d_packed.register_fake
def _(x, data, row_sums, scales, bias, k, k_pad, offset, bits, a_bits, a_step, a_signed, geometry):  # type: ignore[no-untyped-def]
    kh, kw, sh, sw, ph, pw, dh, dw, _ = geometry
    ho, wo = ((size + 2 * p - d * (kk - 1) - 1) // s + 1
              for size, kk, s, p, d in zip(x.shape[2:], (kh, kw), (sh, sw), (ph, pw), (dh, dw), strict=True))
    return x.new_empty((x.shape[0], data.shape[0], ho, wo))


@torch.library.custom_op("bitmix::qmatmul_steps", mutates_args=())
def qmatmul_steps(a: torch.Tensor, b: torch.Tensor, bits: int, a_step: float, a_signed: bool, b_step: float,
                  b_signed: bool) -> torch.Tensor:
    plan = KernelPlan("", "matmul", Precision(bits, bits), a_step, a_signed, b_step=b_step, b_signed=b_signed)
    return torch.from_numpy(matmul_kernel(_np(a), _np(b), plan))


@qmatmul_steps.register_fake
def _(a, b, bits, a_step, a_signed, b_step, b_signed):  # type: ignore[no-untyped-def]
    return torch.matmul(a, b)


class PortableLayer(nn.Module):
    """A `KernelLayer` with its plan as buffers and plain scalars: exportable, saveable."""

    def __init__(self, plan: KernelPlan, clamp: tuple[float, float] | None = None, floats_too: bool = False) -> None:
        super().__init__()
        self.name, self.kind, self.bits = plan.name, plan.kind, plan.bits
        self.clamp = clamp  # the kernel layer's fused ReLU/hardtanh (``layout.fuse_epilogues``)
        self.floats_too = floats_too  # the graph reads (floats, next conv's input): ``layout.code_chains``
        self.a_step, self.a_signed = plan.a_step, plan.a_signed
        self.b_step, self.b_signed = plan.b_step, plan.b_signed
        self.a_axis, self.b_axis = plan.a_axis, plan.b_axis  # per-row steps (`bitmix.ir.row_steps`)
        if plan.kind == "matmul":
            return
        p = plan.packed
        assert p is not None and plan.w_scales is not None
        self.register_buffer("data", torch.from_numpy(p.data.copy()))
        self.register_buffer("row_sums", torch.from_numpy(p.row_sums.copy()))
        self.register_buffer("scales", torch.from_numpy(np.ascontiguousarray(plan.w_scales, dtype=np.float32)))
        self.register_buffer("bias", None if plan.bias is None else torch.from_numpy(plan.bias.copy()))
        self.register_buffer("a_scale", None if plan.a_scale is None else plan.a_scale.clone())  # smoothing
        self.register_buffer("rotation_signs", None if plan.rotation_signs is None else plan.rotation_signs.clone())
        self.register_buffer("a_shift", None if plan.a_shift is None else plan.a_shift.clone())  # mid-rise grid
        self.k, self.k_pad, self.offset = p.k, p.k_pad, p.offset
        self.geometry = [*plan.kernel_size, *plan.stride, *plan.padding, *plan.dilation, plan.groups]

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "matmul":
            assert other is not None
            if self.a_axis is None or self.b_axis is None:
                return qmatmul_steps(x, other, self.bits.a, self.a_step, self.a_signed, self.b_step, self.b_signed)
            x, other = x.float(), other.float()
            a_rows, b_cols = row_steps_of(x, self.a_step, self.a_axis), row_steps_of(other, self.b_step, self.b_axis)
            out = qmatmul_steps(x / a_rows, other / b_cols, self.bits.a, 1.0, self.a_signed, 1.0, self.b_signed)
            return out * (a_rows * b_cols)  # the lowered layer's order (`lower._run_matmul`)
        if self.rotation_signs is not None:
            x = rotate_input(x, self.rotation_signs)  # the fake-quant layer's transform, bit for bit
        if self.a_scale is not None:
            x = x * self.a_scale  # the lowered layer's float32 product, so the codes match bit for bit
        if self.a_shift is not None:
            x = x - self.a_shift  # `lower.mid_rise_input`
        if self.a_axis is not None:  # per-row steps, as `lower._run_linear`
            step = row_steps_of(x, self.a_step, self.a_axis)
            out = qlinear_packed(x / step, self.data, self.row_sums, self.scales, None, self.k, self.k_pad,
                                 self.offset, self.bits.w, self.bits.a, 1.0, self.a_signed) * step
            return out if self.bias is None else out + self.bias
        args = (x, self.data, self.row_sums, self.scales, self.bias, self.k, self.k_pad, self.offset, self.bits.w,
                self.bits.a, self.a_step, self.a_signed)
        out = qlinear_packed(*args) if self.kind == "linear" else qconv2d_packed(*args, self.geometry)
        out = out if residual is None and self.clamp is None else conv_epilogue(out, residual, self.clamp)
        return (out, out) if self.floats_too else out


def portable(lowered: nn.Module) -> nn.Module:
    """A copy of a lowered model with every `KernelLayer` replaced by a `PortableLayer`."""
    module = copy.deepcopy(lowered)
    for path, layer in list(module.named_modules()):
        if isinstance(layer, KernelLayer):
            parent_path, _, attr = path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            setattr(parent, attr, PortableLayer(layer.plan, layer.clamp, layer.__dict__.get("floats_too", False)))
    return module
