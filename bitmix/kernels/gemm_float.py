"""The ``portable`` path's products on the platform's float BLAS (through torch), exactly.

The ``portable`` micro-kernels are plain Numba loops over the packed layout: 0.3-2 GMAC/s, so a CPU
without AVX2 (ARM, older x86) ran a ResNet 1x1 conv (3136 x 64 -> 256) in 28 ms and a 196 x 2304 -> 256
one in 84 ms, 30-100x behind torch's float32 GEMM on the same shapes (Sapphire Rapids, 2026-12-05).

A product of integer codes is exact in floating point when every partial sum is an integer the
format holds: here ``|a8| <= 128`` and ``|w| <= 2^(bits-1)``, so float32 is exact while
``K * 128 * 2^(bits-1) <= 2^24`` (K <= 1024 at 8-bit weights, 16384 at 4-bit) and float64 up to
2^53 (any K the kernels take, ``limits.MAX_K_PAD``). In that range BLAS's blocking, summation order
and FMAs cannot change a bit, so the result equals the integer kernels'. The engine keeps an
unpacked float copy of each weight (4 or 8 bytes a code, built at its first product): the
portable path trades memory for speed; the SIMD paths never build it. GEMV shapes (fewer than
``MIN_M`` rows) stay on the packed loops: they stream the weight once a call, and the float copy is
8x the bytes of an int4 weight (1 x 4096 x 4096 int4 from DRAM: 59 ms with the copy built per weight,
against the loops' ~9 ms).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from bitmix.kernels.pack import PackedWeight, unpack_weights
from bitmix.kernels.threads import thread_count

F32_EXACT = 1 << 24  # float32's largest run of consecutive integers
MIN_M = 4  # activation rows from which a product runs here (``launch.run_core``)

_FLOATS: weakref.WeakKeyDictionary[PackedWeight, torch.Tensor] = weakref.WeakKeyDictionary()


def _dtype(w: PackedWeight) -> torch.dtype:
    """float32 when every partial sum of a product with int8 activations stays within its exact integers."""
    return torch.float32 if w.k_pad * 128 * (1 << (w.bits - 1)) <= F32_EXACT else torch.float64


def _weight(w: PackedWeight, groups: int) -> torch.Tensor:
    """``w``'s codes as (groups, N / groups, k_pad) floats, zero padded; built once per weight."""
    t = _FLOATS.get(w)
    if t is None:
        codes = np.zeros((w.n, w.k_pad), dtype=np.float32)
        codes[:, : w.k] = unpack_weights(w)
        t = _FLOATS[w] = torch.from_numpy(codes).to(_dtype(w))
    return t.view(groups, w.n // groups, w.k_pad)


def run(a8: np.ndarray, w: PackedWeight, shift: int, groups: int, m: int, mp: int, out: np.ndarray,
        parallel: bool) -> None:
    """``out[:m]`` (int32, (M, N)) = the exact product of ``a8`` (``groups`` blocks of ``mp`` rows of
    ``w.k_pad`` signed bytes, pad columns zero) with ``w``, plus ``shift`` times each weight row's sum:
    the tiled driver's result (``tiling``), on ``torch.bmm`` with Numba's thread count when ``parallel``,
    else one thread. (A compiled model's forward holds torch to one thread for its own ops,
    ``compiler.torch_threads``; switching costs well under a microsecond, the second core halves a conv.)"""
    wt = _weight(w, groups)
    a = torch.from_numpy(a8[: groups * mp * w.k_pad].reshape(groups, mp, w.k_pad)[:, :m]).to(wt.dtype)
    own = torch.get_num_threads()
    want = thread_count() if parallel else 1
    if want != own:
        torch.set_num_threads(want)
    try:
        acc = torch.bmm(a, wt.transpose(1, 2))  # (groups, M, N / groups), exact integers
    finally:
        if want != own:
            torch.set_num_threads(own)
    out[:m] = acc.transpose(0, 1).reshape(m, w.n).numpy()  # whole numbers: the int32 cast is exact
    if shift:
        out[:m] += np.int32(shift) * w.row_sums
