"""Run one prepared product on the engine ``dispatch`` chooses: the AMX tile engine, the tiled
SIMD driver (serially or in parallel), or on the ``portable`` path the exact float BLAS product
(``gemm_float``)."""

from __future__ import annotations

import functools
import time

import numba
import numpy as np
from numba import njit, prange

from bitmix.kernels import amx, gemm_avx2, gemm_float, gemm_vnni
from bitmix.kernels.isa import isa_of
from bitmix.kernels.pack import PackedWeight
from bitmix.kernels.routing import DispatchSettings, dispatch
from bitmix.kernels.threads import thread_count
from bitmix.kernels.tiling import MR, core_for

SERIAL_MACS_PER_S = 6e10  # one core's int4 GEMV/GEMM rate, measured on Sapphire Rapids and Zen 3 (+-30%)


@njit(parallel=True, cache=True)
def _empty_launch(x):
    for i in prange(x.shape[0]):
        x[i] += 1


@functools.cache
def serial_max_macs() -> int:
    """Largest product worth running serially on the vpdpbusd kernels: a parallel launch saves
    half the serial time, so it pays once ``macs / (2 * SERIAL_MACS_PER_S)`` exceeds the launch
    cost, measured here once per process (see ``threads`` for what each layer costs)."""
    x = np.zeros(max(2, numba.get_num_threads()))
    _empty_launch(x)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        _empty_launch(x)
        times.append(time.perf_counter() - start)
    return max(1 << 20, int(sorted(times)[3] * 2 * SERIAL_MACS_PER_S))


def _parallel(settings: DispatchSettings, macs: int, rate: float = SERIAL_MACS_PER_S) -> bool:
    """Parallel drivers for this product? Forced by ``settings.serial``, else by size (``serial_max_macs``)."""
    if settings.serial is not None:
        return not settings.serial
    return thread_count() > 1 and macs > serial_max_macs() * (rate / SERIAL_MACS_PER_S)


def activation_layout(w: PackedWeight, m: int, groups: int, settings: DispatchSettings | None = None
                      ) -> tuple[int, int]:
    """``(mp, kp)``: padded rows and row length of the activation byte buffer the engine reads.

    The vpdpbusd kernels need pad columns zeroed (the stored weight pad is ``offset``, not
    0); the AMX engine ignores pad contents, so its buffer may be ``np.empty``.
    """
    if (settings or dispatch.settings).uses_amx(w, m, groups):
        return -(-m // amx.BLOCK) * amx.BLOCK, amx.padded_k(w.k)
    return (m if m < MR else -(-m // MR) * MR), w.k_pad


_NO_F32 = np.zeros(0, dtype=np.float32)
_NO_Y = np.zeros((0, 0, 0), dtype=np.float32)
_NO_I32 = np.zeros(0, dtype=np.int32)


def run_core(a8, asum, w: PackedWeight, shift: int, groups: int, m: int, mp: int, out: np.ndarray | None,
             taps: tuple[int, int, int] | None = None, nchw: tuple | None = None,
             settings: DispatchSettings | None = None) -> None:
    """Run one prepared product (activations already shifted into ``a8``/``asum``, laid out by
    ``activation_layout``) on the engine ``settings`` (default: the dispatch's) choose, serially
    when it is too small to repay a parallel launch (see ``serial_max_macs``). ``taps`` = (c, kh, kw)
    says the AMX engine's activation rows are a channels-last im2col (see ``amx.weight_tiles``);
    ``nchw`` = (scale, bias or None, hw, y) makes the AMX engine write a conv's dequantized NCHW
    output ``y`` instead of ``out``."""
    s = settings or dispatch.settings
    macs = m * w.n * w.k_pad
    if s.uses_amx(w, m, groups):
        parallel = _parallel(s, macs, amx.AMX_MACS_PER_S)
        kp = amx.padded_k(w.k)
        m_step, n_step, rows_outer = amx.task_grid(m, w.n, 4 * thread_count() if parallel else 1)
        if nchw is None:
            epilogue = (False, _NO_F32, _NO_F32, False, 1, _NO_Y)
        else:
            scale, bias, hw, y = nchw
            epilogue = (True, scale, _NO_F32 if bias is None else bias, bias is not None, hw, y)
        amx.driver(parallel)(a8, kp, amx.weight_tiles(w, taps), m, w.n, w.row_sums, shift, amx.tile_palette(),
                             m_step, n_step, rows_outer, _NO_I32 if out is None else out.reshape(-1), *epilogue)
        return
    isa = isa_of(s.path)
    if isa == "avx512vnni" and groups == 1 and m >= gemm_vnni.MIN_M:
        gemm_vnni.run(a8, asum, w, shift, m, out, _parallel(s, macs))
        return
    if isa == "avx2" and groups == 1 and m >= gemm_avx2.MIN_M:
        gemm_avx2.run(a8, asum, w, shift, m, out, _parallel(s, macs))
        return
    if isa == "portable" and out is not None and m >= gemm_float.MIN_M:
        gemm_float.run(a8, w, shift, groups, m, mp, out, _parallel(s, macs))
        return
    core_for(w.bits, isa, _parallel(s, macs))(a8, asum, w.data.reshape(-1), w.row_sums, shift, groups,
                                                         m, mp, w.n // groups, w.k_pad, out)
