"""Kernel benchmark: bitmix GEMV/GEMM vs torch fp32 and torch int8 dynamic, in one process.

Protocol (``shared/reference/kernels.md`` section 5.4): threads pinned to the machine's cores
for both Numba and torch, a warm-up before timing, medians of repeats, every case timed
against both baselines in the same run, in turns (``ROUNDS`` rounds; a ratio is the median of the
rounds' ratios, printed with their range). "ours" is ``bitmix.kernels.gemm`` on int8
activation codes (the kernel; activation quantization excluded) plus, for GEMV, ``qlinear``
(float in, float out, like torch). "cold" GEMV rotates over enough weight copies (> 3x
L3) that each call streams its weights from DRAM -- for ours and torch's alike.
Bandwidth is a streaming read measured in the same run; ``pct_bandwidth`` is effective
weight GB/s over it. ``engine`` names what ran: ``amx`` (the tile engine, which reads the
weights as cached int8 tiles, so ``weight_bytes`` is then N*K) or the SIMD kernels
(``avx512vnni``, ``avx2``, ``portable``).
Cold-start: a fresh interpreter pays import + first call, once with an empty Numba cache
(compile time) and once with the warm cache (must not recompile).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange

from bitmix.kernels import amx, cpu
from bitmix.kernels.matmul import gemm
from bitmix.kernels.pack import PackedWeight, code_range, pack_weights
from bitmix.kernels.quant import qlinear
from bitmix.kernels.routing import dispatch


def _l3_bytes(default: int = 32 << 20) -> int:
    """Last-level cache size from sysfs (e.g. "491520K"), else 32 MiB."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError):
        return default


L3_BYTES = _l3_bytes()
COLD_BYTES = 3 * L3_BYTES
RESNET50 = [(3136, 64, 576), (784, 128, 1152), (196, 256, 2304), (49, 512, 4608), (3136, 256, 64)]


ROUNDS = 5  # blocks per contender in ``_round_medians``


def _median_time(fn: Callable[[int], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn(i)`` over ``repeats`` calls after ``warmup`` calls."""
    return float(np.median(_round_medians({"f": fn}, repeats, warmup, rounds=1)["f"]))


def _round_medians(fns: dict[str, Callable[[int], object]], repeats: int, warmup: int = 3,
                   rounds: int | None = None) -> dict[str, list[float]]:
    """Per contender, the median wall time of ``fn(i)`` in each of ``rounds`` rounds; a round times every
    contender in turn, one block each of ``repeats / rounds`` back-to-back calls (``i`` counts on across
    blocks, so cold cases keep rotating their copies).

    In turns because the shared VMs this runs on have slow spells (a case's torch int8 baseline 1.24x
    slower than ours in one block and 0.74-0.84x in the next, while interleaved calls of the same kernels
    timed alike: AMD EPYC, 2026-12-07), and a spell then hits every contender of the round alike; ratios are
    taken round by round (``_paired``). Each block starts after a pause and ``warmup`` untimed calls (one
    after the first round): torch's OpenMP threads keep spinning ~1 ms after each torch call and would tax
    whichever kernel runs next.
    """
    rounds = max(1, min(ROUNDS if rounds is None else rounds, repeats))
    per_block = -(-repeats // rounds)
    calls = dict.fromkeys(fns, 0)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.05)
            for _ in range(warmup if r == 0 else 1):
                fn(calls[name])
                calls[name] += 1
            times = []
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn(calls[name])
                times.append(time.perf_counter() - t0)
                calls[name] += 1
            out[name].append(float(np.median(times)))
    return out


def _paired(base: list[float], ours: list[float]) -> tuple[float, float, float]:
    """``base / ours`` round by round (``_round_medians``): (median, lowest, highest)."""
    ratios = np.array(base) / np.array(ours)
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max())


@njit(parallel=True, cache=True, fastmath=True)
def _stream_sum(x):
    total = 0.0
    for i in prange(x.size):
        total += x[i]
    return total


def measure_bandwidth(mib: int = 256) -> dict[str, float]:
    """Streaming-read GB/s over a ``mib`` MiB array: numpy sum (1 thread) and a Numba prange sum."""
    x = np.ones(mib << 17, dtype=np.float64)
    t_np = _median_time(lambda _: x.sum(), 5, 1)
    t_nb = _median_time(lambda _: _stream_sum(x), 5, 1)
    return {"numpy_gbps": x.nbytes / t_np / 1e9, "numba_gbps": x.nbytes / t_nb / 1e9}


_COLD_START = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from bitmix.kernels import amx, dispatch, gemm, pack_weights
from bitmix.kernels.isa import isa_of
from bitmix.kernels.tiling import core_for
t1 = time.perf_counter()
res = {"import_s": t1 - t0, "first_call_s": {}, "cache_misses": 0}
on_amx = dispatch.path == "avx512amx"
for bits in map(int, sys.argv[1].split(",")):
    w = pack_weights(np.ones((64, 256), np.int8), bits)
    t = time.perf_counter()
    for serial in (True, False):  # every serial driver, then every parallel one
        with dispatch.use(serial=serial):
            gemm(np.ones((1, 256), np.int8), w, 8, True)
            if on_amx:
                gemm(np.ones((64, 256), np.int8), w, 8, True)  # 1 M MACs: the AMX engine
    res["first_call_s"][bits] = time.perf_counter() - t
    for parallel in (True, False):
        res["cache_misses"] += sum(core_for(bits, isa_of(dispatch.path), parallel).stats.cache_misses.values())
if on_amx:
    res["cache_misses"] += sum(sum(amx.driver(p).stats.cache_misses.values()) for p in (True, False))
print(json.dumps(res))
"""


def measure_cold_start(bits: list[int], prefill: bool = True) -> dict[str, object]:
    """Import + first-call times in fresh interpreters: empty Numba cache, then the warm one."""
    arg = ",".join(map(str, bits))

    def run(**env: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", _COLD_START, arg],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:  # its last line says why; the command line is a page of script
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise RuntimeError(f"the cold-start interpreter failed: {last}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if prefill:
        run()  # fills the project cache if this is the first run after an install
    with tempfile.TemporaryDirectory() as tmp:
        empty = run(NUMBA_CACHE_DIR=tmp)
    return {"empty_cache": empty, "warm_cache": run()}


def _torch_int8_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's int8 dynamic-quantized linear (oneDNN/FBGEMM), per-channel weight scales."""
    scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def _random_packed(rng: np.random.Generator, n: int, k: int, bits: int) -> PackedWeight:
    lo, hi = code_range(bits)
    return pack_weights(rng.integers(lo, hi, (n, k), endpoint=True, dtype=np.int8), bits)


def _copies(nbytes: int, regime: str) -> int:
    return 1 if regime == "hot" else max(2, -(-COLD_BYTES // nbytes))


def _bench_case(
    rng: np.random.Generator,
    m: int,
    n: int,
    k: int,
    w_bits: int,
    regime: str,
    repeats: int,
    bandwidth: float,
    with_qlinear: bool,
) -> list[dict]:
    op = "gemv" if m == 1 else "gemm"
    a_bits = 8
    # cold copies are memory copies of one random weight: cheap to make, distinct in memory
    first = _random_packed(rng, n, k, w_bits)
    ours_w = [first] + [dataclasses.replace(first, data=first.data.copy())
                        for _ in range(_copies(n * k * w_bits // 8, regime) - 1)]
    codes = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x = torch.randn(m, k)
    x_np = x.numpy()
    scales = np.full(n, 0.01, np.float32)
    w_ref = torch.randn(n, k)
    w_fp32 = [w_ref.clone() for _ in range(_copies(n * k * 4, regime))]
    int8_lin = [_torch_int8_linear(w_ref) for _ in range(_copies(n * k, regime))]

    def ours(i: int) -> None:
        gemm(codes, ours_w[i % len(ours_w)], a_bits, True)

    def ours_q(i: int) -> None:
        qlinear(x_np, ours_w[i % len(ours_w)], scales, 0.05, a_bits, True, None)

    def fp32(i: int) -> None:
        torch.nn.functional.linear(x, w_fp32[i % len(w_fp32)])

    def int8(i: int) -> None:
        int8_lin[i % len(int8_lin)](x)

    fns = {op: ours, "torch_fp32": fp32, "torch_int8_dynamic": int8}
    if with_qlinear:
        fns["qlinear"] = ours_q
    per_round = _round_medians(fns, repeats)
    base = {name: per_round[name] for name in ("torch_fp32", "torch_int8_dynamic")}
    mine = {name: per_round[name] for name in (op, "qlinear") if name in per_round}
    settings = dispatch.settings
    on_amx = settings.uses_amx(first, m, 1)
    wbytes = amx.weight_tiles(first).nbytes if on_amx else first.nbytes  # the bytes the engine reads
    records = []
    for name, rounds in mine.items():
        secs = float(np.median(rounds))
        for bname, brounds in base.items():
            speedup, low, high = _paired(brounds, rounds)
            records.append(
                {
                    "op": name,
                    "engine": settings.engine(first, m, 1),
                    "shape": [m, n, k],
                    "w_bits": w_bits,
                    "a_bits": a_bits,
                    "seconds": secs,
                    "baseline": bname,
                    "baseline_seconds": float(np.median(brounds)),
                    "speedup": speedup,  # the median of the rounds' ratios, not a ratio of two medians
                    "speedup_range": [low, high],
                    "rounds": len(rounds),
                    "regime": regime,
                    "gops": 2 * m * n * k / secs / 1e9,
                    "weight_gbps": wbytes / secs / 1e9,
                    "pct_bandwidth": 100 * wbytes / secs / 1e9 / bandwidth,
                    "weight_bytes": wbytes,
                    "rotating_copies": len(ours_w),
                }
            )
    return records


def _ratio_cell(r: dict, unit: str) -> str:
    low, high = r["speedup_range"]
    return f"{r['speedup']:.2f}× [{low:.2f}-{high:.2f}] ({r['baseline_seconds'] * 1e3:.2f}{unit})"


def _print_table(records: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    denied = ", AMX denied to all" if meta["amx_denied"] else ""
    table = Table(title=f"bitmix kernels ({meta['kernel_path']}{denied}, {meta['threads']} threads, Numba "
                        f"{meta['threading_layer']} layer)")
    for col in ("op", "engine", "M×N×K", "w/a", "regime", "ours ms", "GOP/s", "wGB/s", "%BW", "vs fp32", "vs int8 dyn"):
        table.add_column(col, justify="right")
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["op"], tuple(r["shape"]), r["w_bits"], r["a_bits"], r["regime"]), {})[r["baseline"]] = r
    for (op, shape, wb, ab, regime), by in groups.items():
        r = next(iter(by.values()))
        table.add_row(
            op,
            r["engine"],
            "×".join(map(str, shape)),
            f"{wb}/{ab}",
            regime,
            f"{r['seconds'] * 1e3:.3f}",
            f"{r['gops']:.0f}",
            f"{r['weight_gbps']:.1f}",
            f"{r['pct_bandwidth']:.0f}",
            _ratio_cell(by["torch_fp32"], " ms"),
            _ratio_cell(by["torch_int8_dynamic"], ""),
        )
    console = Console(width=max(Console().width, 170))
    console.print(table)
    console.print(escape(f"vs: the baseline's time over ours, the median of the {ROUNDS} rounds' ratios "
                         "[lowest-highest] (baseline ms); a wide range: the machine changed speed during the case"))
    if meta["loadavg_1min"] > 0.5:
        console.print(f"[yellow]warning: load average {meta['loadavg_1min']:.1f} -- other processes share the cores")
    bw = meta["bandwidth"]
    console.print(f"streaming read: numpy {bw['numpy_gbps']:.1f} GB/s, numba {bw['numba_gbps']:.1f} GB/s")
    cs = meta["cold_start"]
    for label in ("empty_cache", "warm_cache"):
        c = cs[label]
        firsts = ", ".join(f"w{b}: {s:.2f}s" for b, s in c["first_call_s"].items())
        console.print(
            f"cold start ({label}): import {c['import_s']:.2f}s, first call {firsts}, "
            f"recompiled kernels: {c['cache_misses']}"
        )


def run_kernel_bench(quick: bool = False, json_path: str | None = None, no_amx: bool = False) -> list[dict]:
    """Run all cases, print a table, optionally write the JSON records; returns the records. ``no_amx`` first makes
    this process (and the cold-start children it starts) a CPU without AMX (``cpu.deny_amx``)."""
    if no_amx:
        cpu.deny_amx()
    path = dispatch.path  # a BITMIX_KERNEL_PATH this CPU cannot run: one line now, not a failed child process
    load_before = os.getloadavg()[0]  # before our own work adds to it
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    gemv_bits = [4, 2] if quick else [4, 2, 8]
    gemm_bits = [4] if quick else [4, 2, 8]
    cold_start = measure_cold_start([4] if quick else gemv_bits, prefill=not quick)
    bandwidth = measure_bandwidth(128 if quick else 256)
    bw = max(bandwidth.values())
    t_end = time.perf_counter() + 2.0  # clock ramp before any timing
    x, w = torch.randn(64, 1024), torch.randn(1024, 1024)
    while time.perf_counter() < t_end:
        torch.nn.functional.linear(x, w)
    records: list[dict] = []
    gemv_shapes = [(1, 4096, 4096)] if quick else [(1, 4096, 4096), (1, 11008, 4096)]
    for m, n, k in gemv_shapes:
        for bits in gemv_bits:
            for regime in ("hot", "cold"):
                reps = 20 if quick else 100
                records += _bench_case(rng, m, n, k, bits, regime, reps, bw, with_qlinear=regime == "hot")
    gemm_shapes = [(m, 4096, 4096) for m in ((8,) if quick else (8, 64, 256))] + RESNET50
    for m, n, k in gemm_shapes:
        for bits in gemm_bits:
            reps = 5 if quick or m * n * k > 2e8 else 20
            records += _bench_case(rng, m, n, k, bits, "hot", reps, bw, with_qlinear=False)
    meta = {
        "loadavg_1min": load_before,
        "kernel_path": path,
        "amx_denied": no_amx,
        "threads": threads,
        "threading_layer": numba.threading_layer(),
        "bandwidth": bandwidth,
        "cold_start": cold_start,
    }
    for r in records:
        r.update(kernel_path=path, amx_denied=no_amx, threads=threads, threading_layer=meta["threading_layer"],
                 bandwidth_gbps=bw, loadavg_1min=meta["loadavg_1min"])
    _print_table(records, meta)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
    return records
