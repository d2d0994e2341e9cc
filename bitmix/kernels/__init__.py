"""Bit-packed int2/int4/int8 CPU kernels (Numba) and their integer reference.

``ACTIVE_PATH`` names the SIMD path chosen at import time (see ``bitmix.kernels.simd``).
"""

from bitmix.kernels import reference
from bitmix.kernels.batched import bmm
from bitmix.kernels.conv import conv2d
from bitmix.kernels.matmul import ACTIVE_PATH, gemm
from bitmix.kernels.pack import PackedWeight, pack_weights, unpack_weights
from bitmix.kernels.quant import qconv2d, qlinear, quantize_activations
from bitmix.kernels.simd import available_paths

__all__ = [
    "ACTIVE_PATH",
    "PackedWeight",
    "available_paths",
    "bmm",
    "conv2d",
    "gemm",
    "pack_weights",
    "qconv2d",
    "qlinear",
    "quantize_activations",
    "reference",
    "unpack_weights",
]
