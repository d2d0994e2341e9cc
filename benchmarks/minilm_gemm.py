"""Small-M GEMMs on MiniLM's linear shapes against torch's int8 GEMM, in one run:
``python benchmarks/minilm_gemm.py [--repeats N]``.

Rows M = 64 (MiniLM at 1x64 tokens), (K, N) in {384, 1536}: the attention projections (384 -> 384)
and the FFN (384 -> 1536, 1536 -> 384). Contenders, all on int8 activations:

- ``gemm``: ``bitmix.kernels.gemm``, exact int32 product of int8 codes and 4-bit / 8-bit packed weights;
- ``linear``: a prepared ``LinearKernel`` (float rows in, quantize + GEMM + dequantize epilogue, float
  rows out: what a compiled model's linear runs);
- ``torch._int_mm``: torch's int8 x int8 -> int32 GEMM (oneDNN/FBGEMM), weight pre-transposed;
- ``torch fp32``: ``F.linear`` in float32.

Ratios > 1 mean bitmix is faster. Medians over ``--repeats`` calls, one contender at a time;
threads = the CPU affinity.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numba
import numpy as np
import torch

from bitmix.kernels import cpu, dispatch, gemm, pack_weights, prepare_linear
from bitmix.kernels.pack import code_range
from bitmix.tools.speed import median_seconds

SHAPES = [(64, 384, 384), (64, 1536, 384), (64, 384, 1536)]  # (M, N, K)


def _median(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()``; after a pause, so torch's OpenMP threads, which spin ~1 ms after
    each torch call (``bitmix.kernels.bench._round_medians``), have gone idle and tax no contender."""
    time.sleep(0.05)
    return median_seconds(fn, repeats, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-amx", action="store_true", help="as on a CPU without AMX: torch's int8 GEMM (oneDNN) "
                        "then takes its AVX-512 VNNI code, as bitmix its avx512vnni path (`cpu.deny_amx`)")
    args = parser.parse_args()
    if args.no_amx:
        cpu.deny_amx()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    denied = ", AMX denied to all" if args.no_amx else ""
    print(f"path {dispatch.path}{denied}, {threads} threads, load {load:.1f}; times in us (median of {args.repeats})")
    print(f"{'M x N x K':>14} {'w':>2} {'gemm':>7} {'linear':>7} {'_int_mm':>7} {'fp32':>7} "
          f"{'gemm/_int_mm':>12} {'linear/_int_mm':>14} {'linear/fp32':>11}")
    for m, n, k in SHAPES:
        codes = rng.integers(-128, 128, (m, k), dtype=np.int8)
        a_t = torch.from_numpy(codes)
        b_t = torch.from_numpy(rng.integers(-128, 128, (n, k), dtype=np.int8)).t().contiguous()
        x = torch.randn(m, k)
        x_np = x.numpy()
        w_f = torch.randn(n, k)
        t_int = _median(partial(torch._int_mm, a_t, b_t), args.repeats)
        t_fp = _median(partial(torch.nn.functional.linear, x, w_f), args.repeats)
        for bits in (4, 8):
            lo, hi = code_range(bits)
            w = pack_weights(rng.integers(lo, hi, (n, k), endpoint=True, dtype=np.int8), bits)
            lin = prepare_linear(w, np.full(n, 0.01, np.float32), 0.05, 8, True, np.zeros(n, np.float32))
            t_gemm = _median(partial(gemm, codes, w, 8, True), args.repeats)
            t_lin = _median(partial(lin, x_np), args.repeats)
            print(f"{f'{m}x{n}x{k}':>14} {bits:>2} {t_gemm * 1e6:7.1f} {t_lin * 1e6:7.1f} {t_int * 1e6:7.1f} "
                  f"{t_fp * 1e6:7.1f} {t_int / t_gemm:11.2f}x {t_int / t_lin:13.2f}x {t_fp / t_lin:10.2f}x")


if __name__ == "__main__":
    main()
