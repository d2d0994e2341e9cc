"""End-to-end CPU speed: the compiled model on the packed kernels against the eager FP32
model, timed in the same process (``bitmix bench model``).

Each zoo model is compiled at its target's highest choice (budget 1.0; by default ``int4int2-npu``, i.e.
all-4-bit: first and last quantizable layers 8-bit, every other one 4-bit; ``int8-npu`` is the like-for-like
comparison with ONNX Runtime's int8; no data needed) at its zoo example input,
then the contenders are timed in turns (``interleaved_medians``): each takes ``ROUNDS`` blocks of
warm-up calls and back-to-back timed calls, the blocks alternating between contenders, and its
median over all ``repeats`` timed calls is reported. Contenders: the compiled model (Numba on the
machine's cores, torch's own ops on one thread: ``torch_on_one_thread``), eager FP32, and
(``ort=True``) the same model exported to ONNX and run by ONNX Runtime as static QDQ int8
(``tools/ort_baseline.py``). Each baseline is timed at 1 thread and at the machine's cores (torch threads,
ORT intra-op threads) and compared at the faster of the two, which the table and JSON name: on a loaded
machine torch's pool at 2 threads collapsed (digits-cnn eager 505 ms against 96 ms on 1 thread), which
inflated "vs eager" 5x. "vs eager" / "vs ORT int8" are the baseline's time over the
compiled time (> 1: bitmix wins). Quantization, layout changes and dequantization are inside
the compiled time; compile time is reported separately.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable

import numba
import torch

from bitmix import zoo
from bitmix.errors import BitmixError
from bitmix.ir.precision import as_precision
from bitmix.ir.targets import DEFAULT_TARGET, get_target
from bitmix.kernels import cpu, dispatch
from bitmix.kernels.threads import configure_threading

DEFAULT_MODELS = ("digits-cnn", "resnet18", "resnet50", "mobilenetv2", "minilm")


ROUNDS = 5  # blocks per contender in ``interleaved_medians``


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def interleaved_medians(contenders: dict[str, Callable[[], object]], repeats: int, rounds: int = ROUNDS,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each contender over ``repeats`` timed calls, taken in ``rounds`` blocks
    in turn (a block: ``warmup`` untimed calls, then its share of the timed calls back to back).

    The shared VMs this runs on have slow spells minutes long (one contender timed alone during one
    moved a ratio by 20-40 %); in turns, a spell hits every contender alike. Calls inside a block run
    back to back, as a user's would: alternating single calls would time each contender right after
    another's thread pools, which is not how either runs (compiled MiniLM: 9.4-9.6 ms in blocks, 12.1-12.2 ms
    in single calls alternating with eager torch, the same half hour; AMD EPYC, 2026-12-04)."""
    rounds = max(1, min(rounds, repeats))
    per_block = -(-repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def on_torch_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    """``fn`` with torch on ``threads`` threads, set by the first call of a block (an untimed warm-up call in
    ``interleaved_medians``) when another contender left another count."""
    def call() -> object:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn()
    return call


def faster(by_threads: dict[int, float]) -> tuple[float, int]:
    """A baseline's median seconds and thread count at the faster of the thread counts it was timed at."""
    best = min(by_threads, key=by_threads.__getitem__)
    return by_threads[best], best




def bench_model(name: str, repeats: int, ort: bool = True, threads: int = 1, target: str = DEFAULT_TARGET) -> dict:
    """Compile one zoo model at `target`'s highest choice and time it against eager FP32 (and ORT int8), each
    baseline at 1 and at ``threads`` threads (its faster median is the one compared)."""
    import bitmix

    model, inputs, data = zoo.load(name)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bitmix.compile(model, inputs, target=target, method="eagl", budget=1.0)
    compile_s = time.perf_counter() - start
    counts = tuple(sorted({1, threads}))
    contenders = {f"eager@{n}": on_torch_threads(lambda: model(*inputs), n) for n in counts}
    contenders["compiled"] = on_torch_threads(lambda: cm(*inputs), threads)  # its torch ops run on one thread
    if ort:
        from bitmix.tools.ort_baseline import ort_int8_sessions

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sessions = ort_int8_sessions(model, inputs, data, counts)
        contenders.update({f"ort@{n}": on_torch_threads(run, threads) for n, run in sessions.items()})
    with torch.no_grad():
        medians = interleaved_medians(contenders, repeats)
    torch.set_num_threads(threads)
    compiled = medians["compiled"]
    eager_by_threads = {n: medians[f"eager@{n}"] for n in counts}
    eager, eager_threads = faster(eager_by_threads)
    ort_by_threads = {n: medians[f"ort@{n}"] for n in counts} if ort else {}
    ort_s, ort_threads = faster(ort_by_threads) if ort else (None, None)
    return {
        "model": name,
        "target": target,
        "input_shapes": [list(x.shape) for x in inputs],
        "eager_fp32_s": eager,
        "eager_threads": eager_threads,
        "eager_fp32_s_by_threads": {str(n): t for n, t in eager_by_threads.items()},  # str: JSON's keys
        "compiled_s": compiled,
        "speedup": eager / compiled,
        "ort_int8_s": ort_s,
        "ort_threads": ort_threads,
        "ort_int8_s_by_threads": {str(n): t for n, t in ort_by_threads.items()},
        "vs_ort_int8": None if ort_s is None else ort_s / compiled,
        "compile_s": compile_s,
        "bits": [str(as_precision(b)) for b in sorted(cm.assignment.values())],  # "w/a"
    }


def run_model_bench(models: list[str] | None = None, repeats: int = 20, json_path: str | None = None,
                    ort: bool = True, target: str = DEFAULT_TARGET, no_amx: bool = False) -> list[dict]:
    """Time every model, print a table, optionally write JSON records; returns the records. ``no_amx`` first makes
    this process a CPU without AMX for bitmix and both baselines alike (``cpu.deny_amx``)."""
    from rich.console import Console
    from rich.table import Table

    names = list(models or DEFAULT_MODELS)
    for name in names:
        if name not in zoo.names():
            raise BitmixError(f"unknown model {name!r}; available: {', '.join(zoo.names())}")
    if repeats < 1:
        raise BitmixError(f"repeats={repeats}: must be >= 1")
    get_target(target)  # an unknown name fails here, before any model is built
    if no_amx:
        cpu.deny_amx()
    load = os.getloadavg()[0]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    configure_threading()  # before numba.set_num_threads starts Numba's pool
    numba.set_num_threads(threads)
    records = []
    for name in names:
        rec = bench_model(name, repeats, ort, threads, target)
        rec.update(kernel_path=dispatch.path, threading_layer=numba.threading_layer(), threads=threads,
                   loadavg_1min=load, amx_denied=no_amx)
        records.append(rec)
    table = Table(title=f"compiled ({target} at its highest choice, packed kernels) vs eager FP32 and ORT int8 "
                        f"({dispatch.path}{', AMX denied to all' if no_amx else ''}, "
                        f"{threads} threads, Numba {numba.threading_layer()} layer)",
                  caption=f"eager and ORT: the faster of 1 and {threads} threads (t: the count that won)")
    for col in ("model", "input", "eager FP32 ms", "ORT int8 ms", "compiled ms", "vs eager", "vs ORT int8",
                "compile s"):
        table.add_column(col, justify="right")
    for r in records:
        ort_ms = "-" if r["ort_int8_s"] is None else f"{r['ort_int8_s'] * 1e3:.2f} ({r['ort_threads']}t)"
        vs_ort = "-" if r["vs_ort_int8"] is None else f"{r['vs_ort_int8']:.2f}×"
        table.add_row(r["model"], " ".join("×".join(map(str, s)) for s in r["input_shapes"]),
                      f"{r['eager_fp32_s'] * 1e3:.2f} ({r['eager_threads']}t)", ort_ms, f"{r['compiled_s'] * 1e3:.2f}",
                      f"{r['speedup']:.2f}×", vs_ort, f"{r['compile_s']:.1f}")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if load > 0.5:
        console.print(f"[yellow]warning: load average {load:.1f} -- other processes share the cores")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
    return records
