"""A lowered conv layer's kernel call with its checks done once (issue 15).

``qconv2d_nhwc`` validates the packed weight, scales, bias, activation spec and geometry on
every call: about 30 us of Python per conv on the 2-vCPU VM, as much as a small layer's
kernels. A compiled model calls the same layer with the same constants every time, so
``PreparedConv`` validates them once (through ``qconv2d_nhwc`` itself, on the first call at each
input shape) and later calls at a seen shape go straight to ``conv_nhwc``. Results are the same
function's, so bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitmix.errors import BitmixError
from bitmix.kernels.conv import conv_geometry
from bitmix.kernels.conv_nhwc import _finish, conv_nhwc
from bitmix.kernels.gemm_vnni import NO_CLAMP
from bitmix.kernels.matmul import check_activation_spec
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.quant import _step, qconv2d_nhwc


@dataclass(frozen=True, eq=False)
class PreparedConv:
    """One conv layer's constants (``qconv2d_nhwc``'s arguments); call it with float32 ``x``."""

    w: PackedWeight
    w_scales: np.ndarray
    a_step: float
    a_bits: int
    a_signed: bool
    bias: np.ndarray | None
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    _geoms: dict = field(default_factory=dict, repr=False)  # (shape, channels_last) -> geometry, once checked

    def __call__(self, x: np.ndarray, channels_last: bool, residual: np.ndarray | None = None,
                 clamp: tuple = NO_CLAMP) -> np.ndarray:
        """``qconv2d_nhwc(x, ..., channels_last=channels_last)``, then ``+ residual`` (C-contiguous float32,
        the output's NHWC shape) and clamped to float32 ``clamp = (lo, hi)``, in the kernel's epilogue."""
        key = (x.shape, channels_last)
        fast = self._geoms.get(key)
        if fast is not None and x.dtype == np.float32 and x.flags.c_contiguous and (
                residual is None or (residual.dtype == np.float32 and residual.flags.c_contiguous
                                     and residual.shape == (x.shape[0], fast[0][9], fast[0][10], self.w.n))):
            geom, step, lo, hi, shift, scale = fast
            return conv_nhwc(x, self.w, geom, step, lo, hi, shift, scale, self.bias, channels_last, residual, clamp)
        y = qconv2d_nhwc(x, self.w, self.w_scales, self.a_step, self.a_bits, self.a_signed, self.bias,
                         self.kernel_size, self.stride, self.padding, self.dilation, self.groups, channels_last)
        if residual is not None and (residual.shape != y.shape or residual.dtype != np.float32):
            raise BitmixError(f"residual: expected float32 {y.shape} (the conv's NHWC output), got "
                              f"{residual.dtype} {residual.shape}")
        y = _finish(y, residual, clamp)
        nchw = x.transpose(0, 3, 1, 2).shape if channels_last else x.shape
        geom = conv_geometry(nchw, self.w, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        if geom[8] == 1 or geom[8] == nchw[1] == self.w.n:  # the shapes ``conv_nhwc`` takes itself
            lo, hi, shift = check_activation_spec(self.a_bits, self.a_signed)
            step = _step(self.a_step)
            self._geoms[key] = (geom, step, lo, hi, shift, step * self.w_scales)
        return y
