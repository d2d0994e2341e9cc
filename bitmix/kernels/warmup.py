"""Fill Numba's disk cache for this CPU's kernel path (``python -m bitmix.kernels.warmup``; ``make setup`` runs it).

Every kernel is ``cache=True``, but the cache is only written on a kernel's first call, so a fresh
clone's first compile spent 5-6 s (issue 15) JIT-compiling. This calls each kernel variant the
path can reach once on tiny inputs -- weight widths 2/4/8, signed and unsigned activation codes
(each dtype is its own compiled signature), serial and parallel drivers, GEMV and GEMM shapes,
1x1, k x k, grouped and depthwise convs, the allocator's chain solvers -- so later processes load machine
code from the cache.
"""

from __future__ import annotations

import itertools
import sys
import time

import numpy as np

from bitmix.kernels import dispatch
from bitmix.kernels.pack import SUPPORTED_BITS, pack_weights

_CONVS = (  # (c_in, c_out, kernel, stride, padding, groups, width): 1x1, k x k, grouped, depthwise wide/narrow
    (8, 16, 1, 1, 0, 1, 6),
    (8, 16, 3, 2, 1, 1, 6),
    (8, 16, 3, 1, 1, 2, 6),
    (8, 8, 3, 1, 1, 8, 40),
    (8, 8, 3, 1, 1, 8, 6),
)


def warm(path: str | None = None) -> float:
    """Run every kernel variant of ``path`` (default: this CPU's) once; returns the seconds it took."""
    from bitmix.kernels import bmm, prepare_linear, qconv2d, qconv2d_nhwc, qlinear
    from bitmix.kernels.code_matmul import code_matmul
    from bitmix.kernels.gptq_columns import block_columns
    from bitmix.kernels.hadamard import rotate_rows
    from bitmix.kernels.launch import serial_max_macs
    from bitmix.kernels.range_search import step_errors
    from bitmix.kernels.row_steps import divide_rows, scale_rows

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    serial_max_macs()  # the launch-cost probe the size-based choice runs once per process
    for serial in (True, False, None):
        with dispatch.use(path, serial=serial, amx_min_macs=0, amx_fused_min_macs=0, amx_conv_min_macs=0):
            for bits in SUPPORTED_BITS:
                lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
                w = pack_weights(rng.integers(lo, hi, (24, 40), endpoint=True).astype(np.int8), bits)
                scales = np.full(24, 0.01, dtype=np.float32)
                for signed in (True, False):
                    for rows in (1, 2, 8, 40):  # GEMV, few rows, GEMM
                        qlinear(rng.normal(size=(rows, 40)).astype(np.float32), w, scales, 0.05, 8, signed, scales)
                    for rows in (1, 8, 16):  # lowered linears (fused GEMV, GEMM and AMX kernels), a smoothing factor
                        prepare_linear(w, scales, 0.05, 8, signed, scales, np.ones(40, dtype=np.float32))(
                            rng.normal(size=(rows, 40)).astype(np.float32))
                        prepare_linear(w, scales, 0.05, 4, signed, scales, row_floor=1e-8)(  # per-row steps
                            rng.normal(size=(rows, 40)).astype(np.float32))
                    for c, n, k, s, p, g, width in _CONVS:
                        wc = rng.integers(lo, hi, (n, c // g * k * k), endpoint=True).astype(np.int8)
                        x = rng.normal(size=(1, c, 6, width)).astype(np.float32)
                        args = (pack_weights(wc, bits), np.full(n, 0.01, dtype=np.float32), 0.05, 8, signed)
                        geometry = ((k, k), (s, s), (p, p), (1, 1), g)
                        qconv2d(x, *args, None, *geometry)
                        # lowered convs: NCHW or NHWC floats in, NHWC out
                        qconv2d_nhwc(x, *args, None, *geometry, channels_last=False)
                        qconv2d_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *args, None, *geometry)
            for a_type, b_type in itertools.product((np.int8, np.uint8), repeat=2):  # signed and unsigned codes
                bmm(rng.integers(0, 8, (2, 5, 7)).astype(a_type), rng.integers(0, 8, (2, 7, 4)).astype(b_type))
    for serial in (True, False):
        with dispatch.use(path, serial=serial, amx_conv_min_macs=0):
            for bits in (4, 8):  # AVX2 compiles 8-bit weights apart
                _warm_code_chain(rng, bits)
    step_errors(rng.normal(size=(3, 16)).astype(np.float32), np.full((3, 4), 0.1, dtype=np.float32), 8, 7)  # ranges
    block = rng.normal(size=(1, 4, 5))  # GPTQ's column loop (float64 columns, float32 steps)
    block_columns(block, np.eye(4)[None], np.full((1, 5), 0.1, dtype=np.float32), 8, 7,
                  np.empty(block.shape, dtype=np.float32), np.empty_like(block))
    x = rng.normal(size=(3, 32)).astype(np.float32)  # 4-bit linears: the online rotation and per-row steps
    rotate_rows(x, np.ones(32, dtype=np.float32), 32)
    for bias in (None, np.zeros(32, dtype=np.float32)):
        scale_rows(*divide_rows(x, 0.1, 1e-8), bias)
    q = rng.normal(size=(1, 3, 2, 8)).astype(np.float32).transpose(0, 2, 1, 3)  # attention matmuls (1, 2, 3, 8)
    v = rng.normal(size=(1, 8, 2, 3)).astype(np.float32).transpose(0, 2, 1, 3)  # and (1, 2, 8, 3) operands
    for a in (q, np.ascontiguousarray(q)):  # heads' views and contiguous tensors; K^T is a transposed view
        for b in (v, np.ascontiguousarray(v), q.transpose(0, 1, 3, 2)):
            for floor in (1e-8, None):  # per-row steps, per-tensor steps
                code_matmul(a, b, 0.1, 0.1, floor, (-8, 7), (-8, 7))
    _warm_chain(rng)
    return time.perf_counter() - start


def _warm_chain(rng: np.random.Generator) -> None:
    """The allocator's chain solvers (``chain_kernels``, run by every compile) at the argument types
    ``compiler.chain`` passes: float scores and costs, int64 slot weights (the scaled DP), the closing edge as a
    matrix, or as a contiguous row or a column of one."""
    from bitmix.kernels import chain_kernels

    n, k = 3, 2
    scores, weights, close = rng.random((n, k)), rng.random((n, k, k)), rng.random((k, k))
    kcount = np.full(n, k, dtype=np.int64)
    for closed in (False, True):
        chain_kernels.lagrange_path(scores, weights, kcount, close, 1.0, closed)
    for edge in (np.zeros(k), close[:, 0]):
        suffix = chain_kernels.lagrange_suffix(scores, weights, kcount, edge, 0.5)
    chain_kernels.dp_kernel(scores, np.ones((n, k, k), dtype=np.int64), kcount, 4, -1)
    first = np.arange(k)
    chain_kernels.pareto_step(weights[0, 0, first], scores[0, first], first, weights[1], scores[1], suffix[1],
                              suffix[1], np.inf, np.inf, suffix[1], 1.0, 0.5)


def _warm_code_chain(rng: np.random.Generator, bits: int) -> None:
    """A conv handing the next its input codes (``PreparedConv.to_codes``: the CODES GEMM on VNNI, AVX2 and AMX
    (64 channels), the border pass; ``run_both``: floats and codes), as lowered conv -> conv chains run from their
    second call on; residual adds and ReLUs."""
    from bitmix.kernels import conv_nhwc
    from bitmix.kernels.conv_prepared import PreparedConv

    def conv(c: int, n: int, groups: int = 1) -> PreparedConv:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        w = pack_weights(rng.integers(lo, hi, (n, c // groups * 9), endpoint=True).astype(np.int8), bits)
        return PreparedConv(w, np.full(n, 0.01, dtype=np.float32), 0.05, 4, False, None, (3, 3), (1, 1), (1, 1),
                            (1, 1), groups)

    relu = (np.float32(0), np.float32(np.inf))
    for c, n in ((8, 16), (64, 64)):
        first, second, depthwise = conv(c, n), conv(n, c), conv(c, c, c)
        x = np.abs(rng.normal(size=(1, 6, 6, c))).astype(np.float32)
        y = second(first(x, True), True)  # both layers checked at these shapes
        second(first(x, True), True, y, relu)  # + residual, ReLU: the GEMM's epilogue
        depthwise(x, True, y, relu)  # ... or one pass after the kernel (``_finish``)
        codes = first.to_codes(x, True, relu, second)
        if codes is not None:
            second(codes, True)
        _, codes = first.run_both(x, True, first(x, True), relu, second)  # floats too: a residual stream
        if codes is not None:
            second(codes, True)
    a8 = np.zeros((1, 8, 8, 16), dtype=np.int8)  # the border pass split over threads (large buffers)
    conv_nhwc._code_borders_parallel(a8, np.zeros(64, dtype=np.int64), 1, 1, 6, 6, 16, 0, True)


def main() -> int:
    seconds = warm()
    print(f"bitmix: kernels compiled and cached for the {dispatch.path} path in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
