"""How much slower each lowered layer runs inside a forward than called again right away, and how much of
that its weights' cache state explains.

A lowered layer timed in a loop over itself finds its weights, inputs and outputs in every core's caches;
inside a forward it follows torch ops and other layers, and each core's share of its weights comes from L3
or memory (a model's 4-bit weights are one byte each in the broadcast layout: MiniLM 10.6 MB). Per forward,
in turns, this times every lowered layer three ways:

* ``in model``: as the forward calls it;
* ``repeated``: the same call again at once (inputs, weights and outputs warm on every core);
* ``weights warm``: as the forward calls it, but its weight bytes (every layout built for it) were first
  read on every core, one byte per cache line (``--stride 4096``: one per page, the TLB alone), untimed.

The gap between the first two is the layer's in-model penalty; the third says how much of it is its
weights. Sums per forward, by layer kind and shape, medians over ``--repeats`` forwards of each kind.

    python benchmarks/cache_penalty.py minilm --repeats 100
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import defaultdict

import numba
import numpy as np
import torch
from numba import njit, prange

import bitmix
from bitmix import zoo
from bitmix.compiler import lower
from bitmix.kernels import broadcast
from bitmix.kernels.threads import configure_threading


@njit(parallel=True, cache=True)
def _read_on_every_core(data, stride, copies):
    """One byte every ``stride`` of ``data``, read by each of ``copies`` tasks: with ``copies`` = the thread count,
    TBB hands one to each thread unless a thread is late, which then only makes the warm-up smaller."""
    sums = np.zeros(copies, dtype=np.int64)
    for t in prange(copies):
        s = 0
        for i in range(0, data.shape[0], stride):
            s += data[i]
        sums[t] = s
    return sums.sum()


def _weight_bytes(layer: lower.KernelLayer) -> list[np.ndarray]:
    """Every weight layout built for the layer: the packed codes and the broadcast layouts."""
    w = layer.plan.packed
    if w is None:
        return []
    arrays = [w.data.reshape(-1).view(np.uint8)]
    arrays += [blocks.data for blocks in broadcast._BLOCKS.get(w, {}).values()]
    return arrays


def _group(layer: lower.KernelLayer, x: torch.Tensor, out: object) -> str:
    p = layer.plan
    if p.kind == "matmul":
        return f"matmul {tuple(x.shape)}"
    k = p.packed.k if p.packed is not None else 0
    return f"{p.kind} K={k} N={p.out_features} bits={p.bits}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--stride", type=int, default=64, help="bytes between the weight bytes read (4096: pages)")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    configure_threading()
    numba.set_num_threads(threads)
    torch.set_num_threads(1)
    model, inputs, _ = zoo.load(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bitmix.compile(model, inputs, target="int4int2-npu", method="eagl", budget=1.0)
    cm.recorder.enabled = False
    original = lower.KernelLayer.forward
    mode = {"now": "in model"}
    times: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in ("in model", "repeated", "weights warm")}
    groups: dict[str, str] = {}

    def forward(self, x, other=None, residual=None):
        if mode["now"] == "weights warm":
            for data in _weight_bytes(self):
                _read_on_every_core(data, args.stride, threads)
        start = time.perf_counter()
        out = original(self, x, other, residual)
        elapsed = time.perf_counter() - start
        if mode["now"] == "repeated":
            start = time.perf_counter()
            original(self, x, other, residual)
            elapsed = time.perf_counter() - start
        times[mode["now"]][self.name].append(elapsed)
        groups.setdefault(self.name, _group(self, x, out))
        return out

    lower.KernelLayer.forward = forward
    with torch.no_grad():
        for m in times:
            mode["now"] = m
            cm(*inputs)
        for t in times.values():
            t.clear()
        for i in range(3 * args.repeats):
            mode["now"] = tuple(times)[i % 3]
            cm(*inputs)
    lower.KernelLayer.forward = original
    by_group: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m, per_layer in times.items():
        for name, v in per_layer.items():
            by_group[groups[name]][m] += float(np.median(v)) * len(v) / args.repeats
    print(f"{args.model}: lowered layers per forward, ms (median per layer, summed; {threads} threads; weights read "
          f"every {args.stride} bytes)")
    print(f"{'layers':44s} {'in model':>9s} {'repeated':>9s} {'weights warm':>13s}")
    total = defaultdict(float)
    for g, row in sorted(by_group.items(), key=lambda kv: -kv[1]["in model"]):
        print(f"{g:44s} {row['in model'] * 1e3:9.3f} {row['repeated'] * 1e3:9.3f} {row['weights warm'] * 1e3:13.3f}")
        for m, v in row.items():
            total[m] += v
    print(f"{'all':44s} {total['in model'] * 1e3:9.3f} {total['repeated'] * 1e3:9.3f} "
          f"{total['weights warm'] * 1e3:13.3f}")


if __name__ == "__main__":
    main()
