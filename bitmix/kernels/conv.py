"""Bit-packed integer conv2d: im2col into signed bytes, then the grouped GEMM driver.

im2col writes each group's patches straight into the padded ``(groups, M_pad, k_pad)``
byte buffer the GEMM kernels read (``M = B * Ho * Wo``, K ordered ``(c, kh, kw)`` like
``weight.reshape(C_out, -1)``), fusing the activation shift and the row sums, so the
kernels see exactly what ``gemm`` would. Groups, including depthwise, become the group
axis of one parallel launch rather than one launch per group. Zero padding inserts code
0 (symmetric quantization: zero-point 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels.matmul import (
    activation_layout,
    check_activation_spec,
    check_packed,
    check_range,
    run_core,
    uses_amx,
)
from bitmix.kernels.pack import PackedWeight


@njit(parallel=True, cache=True)
def _im2col(x, shift, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, mp, kp, a8, asum):
    nb, c, h, w = x.shape
    cg = c // groups
    m = nb * ho * wo
    for t in prange(groups * m):
        g = t // m
        row = t - g * m
        b = row // (ho * wo)
        rem = row - b * ho * wo
        oh = rem // wo
        ow = rem - oh * wo
        base = (g * mp + row) * kp
        s = 0
        col = 0
        for ci in range(cg):
            ch = g * cg + ci
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                inside_h = 0 <= ih < h
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    v = -shift
                    if inside_h and 0 <= iw < w:
                        v = np.int64(x[b, ch, ih, iw]) - shift
                    a8[base + col] = v
                    s += v
                    col += 1
        asum[g * mp + row] = s


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints and check its lower bound."""
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= minimum for v in pair):
        raise BitmixError(f"{name}={value!r}: expected an int or a pair of ints >= {minimum}")
    return int(pair[0]), int(pair[1])


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (torch's formula)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv2d(
    a_codes: np.ndarray,
    w: PackedWeight,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    a_bits: int,
    a_signed: bool,
) -> np.ndarray:
    """Exact int32 conv2d of (B, C_in, H, W) codes with weights packed from (C_out, C_in/groups*kh*kw)."""
    w = check_packed(w)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    if not isinstance(a_codes, np.ndarray) or a_codes.dtype.kind not in "iu":
        raise BitmixError(f"a_codes: expected an integer numpy array, got {getattr(a_codes, 'dtype', type(a_codes))}")
    if a_codes.ndim != 4 or a_codes.size == 0:
        raise BitmixError(f"a_codes: expected a non-empty (B, C_in, H, W) array, got shape {a_codes.shape}")
    nb, c, h, wd = a_codes.shape
    if not isinstance(groups, int | np.integer) or groups < 1 or c % groups or w.n % groups:
        raise BitmixError(f"groups={groups!r}: must be >= 1 and divide C_in={c} and C_out={w.n}")
    if w.k != (c // groups) * kh * kw:
        raise BitmixError(
            f"w: packed K={w.k} but C_in/groups*kh*kw = {c // groups}*{kh}*{kw} = {(c // groups) * kh * kw}"
        )
    ho = conv_out_size(h, kh, sh, ph, dh)
    wo = conv_out_size(wd, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise BitmixError(f"a_codes: spatial size {(h, wd)} too small for kernel/padding/dilation (output {ho}x{wo})")
    check_range(int(a_codes.min()), int(a_codes.max()), lo, hi, a_bits, a_signed)
    groups = int(groups)
    m = nb * ho * wo
    mp, kp = activation_layout(w, m, groups)
    a8 = (np.empty if uses_amx(w, m, groups) else np.zeros)(groups * mp * kp, dtype=np.int8)
    asum = np.zeros(groups * mp, dtype=np.int64)
    _im2col(
        np.ascontiguousarray(a_codes),
        shift,
        groups,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        ho,
        wo,
        mp,
        kp,
        a8,
        asum,
    )
    out = np.empty((m, w.n), dtype=np.int32)
    run_core(a8, asum, w, shift, groups, m, mp, out)
    return np.ascontiguousarray(out.reshape(nb, ho, wo, w.n).transpose(0, 3, 1, 2))
