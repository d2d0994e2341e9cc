"""A transposed convolution as an ordinary convolution followed by a pixel shuffle and a crop.

`y = conv_transpose(x, w, stride s, padding p, output_padding o)` scatters each input pixel through the
kernel; its output pixel `s*q + r` (phase r in [0, s)) only meets the kernel taps `t = r + s*m`, m in
[0, M), M = ceil(k / s), at input pixel `q - m`. So every phase is a plain convolution of `x` with an M-tap
kernel (taps reversed, zero where `r + s*m >= k`), and stacking the s^2 phases as output channels gives ONE
conv2d of stride 1 over the original input, `s^2 * C_out` channels, kernel M x M: the sub-pixel form of
Shi et al. 2016 (arXiv 1609.05158) / the "deconvolution" of Zeiler et al., run on the quantized kernels
with no zeros inserted between input pixels (their MACs are the transposed conv's, up to the zero taps when
s does not divide k). A pixel shuffle interleaves the phases; a crop applies `p` and `o`.
Grouped ones too (each group's phases stay inside its group); dilation 1 only (else FP32, reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
# argument positions of stride, padding, output_padding, groups, dilation (torch's defaults after the last given)
_ARGS = {aten.conv_transpose1d.default: (3, 4, 5, 6, 7), aten.conv_transpose2d.input: (3, 4, 5, 6, 7),
         aten.convolution.default: (3, 4, 7, 8, 5)}
_DEFAULTS = (1, 0, 0, 1, 1)


@dataclass(frozen=True)
class Geometry:
    """Per spatial dimension (height, width): the equivalent conv's kernel and padding, and the crop."""

    stride: tuple[int, ...]
    taps: tuple[int, ...]  # M = ceil(k / s)
    pad: tuple[int, ...]  # the equivalent conv's symmetric padding
    conv_out: tuple[int, ...]  # its output size: input + 2 * pad - taps + 1
    start: tuple[int, ...]  # first row / column kept after the shuffle
    out: tuple[int, ...]  # the transposed conv's output size
    trim: tuple[int, ...]  # rows / columns dropped at the end: independent of the input size, unlike `out`
    groups: int = 1


def is_transposed(node: fx.Node) -> bool:
    return node.target in _ARGS and (node.target != aten.convolution.default or bool(node.args[6]))


def node_geometry(node: fx.Node, in_shape: tuple[int, ...]) -> Geometry | None:
    """The geometry of transposed-conv `node` on a conv2d-shaped input (N, C, H, W; H = 1 for a 1-D one), or
    None where no equivalent conv is built (dilation other than 1)."""
    values = [node.args[i] if len(node.args) > i else d for i, d in zip(_ARGS[node.target], _DEFAULTS, strict=True)]
    stride, padding, output_padding, groups, dilation = (
        [int(i) for i in v] if isinstance(v, list | tuple) else [int(v)] for v in values)
    if any(d != 1 for d in dilation):
        return None
    w = node.args[1]
    kernel = tuple(w.meta["val"].shape[2:]) if isinstance(w, fx.Node) and "val" in w.meta else ()
    if len(kernel) == 1:  # conv_transpose1d as height 1
        kernel, stride, padding, output_padding = (1, *kernel), [1, *stride], [0, *padding], [0, *output_padding]
    if len(kernel) != 2 or len(in_shape) != 4:
        return None
    stride, padding, output_padding = ((v * 2 if len(v) == 1 else v) for v in (stride, padding, output_padding))
    return geometry(tuple(in_shape[2:]), kernel, tuple(stride), tuple(padding), tuple(output_padding), groups[0])


def geometry(in_size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             output_padding: tuple[int, ...], groups: int = 1) -> Geometry:
    """The equivalent conv of a transposed conv on inputs of `in_size` (spatial sizes)."""
    taps, pad, conv_out, start, out, trim = [], [], [], [], [], []
    for n, k, s, p, o in zip(in_size, kernel, stride, padding, output_padding, strict=True):
        m = math.ceil(k / s)
        length = (n - 1) * s - 2 * p + k + o
        extra = 1 if k - p + o > s * m else 0  # the output padding reaches past the last full phase block
        taps.append(m)
        pad.append(m - 1 + extra)
        conv_out.append(n + m - 1 + 2 * extra)
        start.append(p + s * extra)
        out.append(length)
        trim.append(s * m + s * extra + p - k - o)  # (conv_out * s) - start - length, for any n
    return Geometry(tuple(stride), tuple(taps), tuple(pad), tuple(conv_out), tuple(start), tuple(out), tuple(trim),
                    groups)


def equivalent_weight(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(C_in, C_out / G, kh, kw) transposed-conv weight -> (C_out * sh * sw, C_in / G, Mh, Mw) conv weight of the
    same G groups, channel `c * sh * sw + rh * sw + rw` holding phase (rh, rw) of output channel c."""
    c_in, c_out, kh, kw = weight.shape
    (sh, sw), (mh, mw) = g.stride, g.taps
    eq = weight.new_zeros(c_out * g.groups, sh, sw, c_in // g.groups, mh, mw)
    per_group = weight.reshape(g.groups, c_in // g.groups, c_out, kh, kw).transpose(1, 2)  # (G, C_out/G, C_in/G, ..)
    for rh in range(sh):
        for uh in range(mh):
            th = rh + sh * (mh - 1 - uh)
            if th >= kh:
                continue
            for rw in range(sw):
                for uw in range(mw):
                    tw = rw + sw * (mw - 1 - uw)
                    if tw < kw:
                        eq[:, rh, rw, :, uh, uw] = per_group[:, :, :, th, tw].reshape(-1, c_in // g.groups)
    return eq.reshape(c_out * g.groups * sh * sw, c_in // g.groups, mh, mw)


def equivalent_bias(bias: torch.Tensor | None, g: Geometry) -> torch.Tensor | None:
    return None if bias is None else bias.repeat_interleave(g.stride[0] * g.stride[1])


def shuffle_and_crop(y: torch.Tensor, stride_h: int, stride_w: int, start_h: int, start_w: int, trim_h: int,
                     trim_w: int) -> torch.Tensor:
    """The equivalent conv's output (N, C_out * sh * sw, H', W') -> the transposed conv's (N, C_out, H, W).
    Plain ints (`shuffle_args`), so a graph can call it; the crop is relative to the ends, so one graph serves
    every input size (symbolic spatial dimensions, torch.compile's recompiles)."""
    n, phases, h, w = y.shape
    c = phases // (stride_h * stride_w)  # not -1: an empty batch leaves -1 ambiguous
    y = y.reshape(n, c, stride_h, stride_w, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * stride_h, w * stride_w)
    return y[:, :, start_h : h * stride_h - trim_h, start_w : w * stride_w - trim_w]


def shuffle_args(g: Geometry) -> tuple[int, ...]:
    return (*g.stride, *g.start, *g.trim)
