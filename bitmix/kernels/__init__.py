"""Bit-packed int2/int4/int8 CPU kernels (Numba) and their integer reference.

Importing this package loads no Numba: packing, the reference and ``dispatch`` are plain
Python/NumPy, and the kernel functions (``gemm``, ``conv2d``, ``bmm``, ``qlinear``, ``qconv2d``,
``quantize_activations``) load their Numba modules on first use, which also picks the
threading layer. ``dispatch`` chooses the SIMD path at the first kernel call
(``routing``; ``dispatch.use("avx2", serial=True)`` overrides it for a block).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bitmix.kernels import cache_guard, reference
from bitmix.kernels.cpu import available_paths
from bitmix.kernels.pack import PackedWeight, pack_weights, unpack_weights
from bitmix.kernels.routing import DispatchSettings, dispatch

cache_guard.drop_stale()  # before any kernel loads machine code from Numba's cache

if TYPE_CHECKING:
    from bitmix.kernels.batched import bmm
    from bitmix.kernels.conv import conv2d
    from bitmix.kernels.linear import LinearKernel, prepare_linear
    from bitmix.kernels.matmul import gemm
    from bitmix.kernels.quant import qconv2d, qconv2d_nhwc, qlinear, quantize_activations

_LAZY = {  # kernel function -> the Numba module defining it
    "bmm": "bitmix.kernels.batched",
    "conv2d": "bitmix.kernels.conv",
    "gemm": "bitmix.kernels.matmul",
    "LinearKernel": "bitmix.kernels.linear",
    "prepare_linear": "bitmix.kernels.linear",
    "qconv2d": "bitmix.kernels.quant",
    "qconv2d_nhwc": "bitmix.kernels.quant",
    "qlinear": "bitmix.kernels.quant",
    "quantize_activations": "bitmix.kernels.quant",
}


def __getattr__(name: str) -> object:
    """Load a kernel's Numba module on first access (PEP 562); later lookups hit the module dict."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DispatchSettings",
    "LinearKernel",
    "PackedWeight",
    "available_paths",
    "bmm",
    "conv2d",
    "dispatch",
    "gemm",
    "pack_weights",
    "prepare_linear",
    "qconv2d",
    "qconv2d_nhwc",
    "qlinear",
    "quantize_activations",
    "reference",
    "unpack_weights",
]
