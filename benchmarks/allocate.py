"""Allocation speed on the exact (coupled) cost model: single budgets, a long chain, a frontier.

Run: .venv/bin/python benchmarks/allocate.py [--repeats N]
Bars (issue 11): allocating ResNet-50 (54 layers, 3 choices 8/4/2) < 50 ms; a 500-layer random
coupled chain (3 choices) < 1 s; a 50-point ResNet-50 frontier < 2 s. Each case times one
`allocate` (or `frontier`) call, i.e. what `compile`'s allocate stage pays, warm (the Numba
kernels compile once per machine, cached on disk); pricing (`price`) and scoring are not
included. Wall and process-CPU medians are both printed: on a shared machine the wall time
includes waiting for a core. mixed-npu (6 weight/activation pairs) and int4int2-npu are shown
for information. Scores are EAGL's (data-free) for ResNet-50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import numpy as np

from bitmix import zoo
from bitmix.compiler import sensitivity
from bitmix.compiler.allocate import Budget, allocate, cheapest_fraction, frontier
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.ir.cost import CostModel
from bitmix.ir.targets import Target, get_target
from bitmix.simulator import price

BITS_842 = Target("bits-8-4-2", (8, 4, 2))  # the 3 choices, b/b, none pinned
BARS_S = {"resnet50 allocate": 0.050, "500-layer chain allocate": 1.0, "resnet50 50-point frontier": 2.0}


def median_s(fn, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) medians of `repeats` warm calls."""
    fn()  # warm-up (JIT, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def random_chain(n: int, seed: int = 0) -> tuple[CostModel, dict]:
    """Coupled like the simulator: edge i costs max(core_i, prefetch_{i+1}) + a producer-hop term."""
    rng = np.random.default_rng(seed)
    bits = (8, 4, 2)
    core = [rng.uniform(1e3, 1e5) * (np.array(bits) / 8) ** rng.uniform(0.3, 1.0) for _ in range(n)]
    pre = [rng.uniform(0, 6e4) * np.array(bits) / 8 for _ in range(n)]
    pair = [np.maximum(core[i][:, None], pre[(i + 1) % n][None, :]) + rng.uniform(0, 300, (3, 3)) for i in range(n)]
    names = tuple(f"l{i}" for i in range(n))
    model = CostModel.of_terms(names, [bits] * n, {"cycles": [np.zeros(3)] * n}, {"cycles": pair})
    scores = {name: dict(zip(bits, np.cumsum(rng.exponential(1, 3)) - 1, strict=True)) for name in names}
    return model, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results = {}

    model, inputs, _ = zoo.load("resnet50")
    graph = capture(model, inputs, "resnet50")
    for tname in ("8/4/2", "mixed-npu", "int4int2-npu"):
        target = BITS_842 if tname == "8/4/2" else get_target(tname)
        costs = price(graph, target)
        scores = sensitivity.score("eagl", sensitivity.ScoreContext(graph=graph, target=target, model=prepare(graph)))
        lowest = cheapest_fraction(costs)
        per_budget = {}
        for b in (0.75, 0.8, 0.9):
            budget = Budget(fraction=max(b, lowest))
            per_budget[b] = median_s(partial(allocate, scores, costs, target, graph.names, budget), args.repeats)
            a = allocate(scores, costs, target, graph.names, budget)
            print(f"resnet50 {tname} budget {b}: {per_budget[b][0] * 1e3:.1f} ms wall, {per_budget[b][1] * 1e3:.1f} "
                  f"ms CPU (solver {a.solver}, gap {a.gap:g}, achieved {a.fraction:.4f})", flush=True)
        if tname == "8/4/2":
            results["resnet50 allocate"] = max(per_budget.values())
            fractions = list(np.linspace(lowest, 1.0, 50))
            results["resnet50 50-point frontier"] = median_s(
                partial(frontier, scores, costs, target, graph.names, fractions), args.repeats)

    chain, chain_scores = random_chain(500)
    target = BITS_842
    frac = cheapest_fraction(chain) + 0.5 * (1 - cheapest_fraction(chain))
    results["500-layer chain allocate"] = median_s(
        partial(allocate, chain_scores, chain, target, chain.names, Budget(fraction=frac)), max(3, args.repeats // 2))

    print("\n| case | wall median | CPU median | bar | wall / bar | CPU / bar |\n|---|---|---|---|---|---|")
    for case, (wall, cpu) in results.items():
        bar = BARS_S[case]
        print(f"| {case} | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | {bar * 1e3:.0f} ms | {wall / bar:.2f} | "
              f"{cpu / bar:.2f} |")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
