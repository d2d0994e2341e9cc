"""Simulator speed and fidelity: pricing time, cycle-level time, analytic/cycle ratios per zoo model.

Run: .venv/bin/python benchmarks/simulator.py [model ...]
Goals: price ResNet-50 for {8,4,2} in < 0.5 s; cycle-level ResNet-50 in < 60 s; analytic
within 5% of cycle-level; ResNet-50 int8 within 20% of NorthPole (42,460 fps, 571 FPS/W).
"""

from __future__ import annotations

import sys
import time

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.ir.targets import get_target
from bitmix.simulator import price, simulate, uniform
from bitmix.simulator.mapping import clear_mapping_cache


def main(names: list[str]) -> None:
    for name in names:
        model, example_inputs, _ = zoo.load(name)
        graph = capture(model, example_inputs, name)
        clear_mapping_cache()  # time pricing from a cold mapper cache
        t0 = time.perf_counter()
        price(graph, get_target("mixed-npu"))
        t_price = time.perf_counter() - t0
        print(
            f"{name}: {len(graph.layers)} layers, {graph.total_macs / 1e9:.2f} GMAC, "
            f"price {{8,4,2}} {t_price * 1e3:.0f} ms (cold)"
        )
        for bits in (8, 4, 2):
            t0 = time.perf_counter()
            a = simulate(graph, uniform(graph, bits), engine="analytic")
            t_a = time.perf_counter() - t0
            t0 = time.perf_counter()
            c = simulate(graph, uniform(graph, bits), engine="cycle")
            t_c = time.perf_counter() - t0
            print(
                f"  int{bits}: {a.throughput_fps:>11,.0f} fps {a.fps_per_w:>8,.0f} FPS/W "
                f"{a.energy_per_frame_j * 1e3:7.3f} mJ/frame util {a.utilization:4.0%} chips {a.chips} | "
                f"analytic/cycle cycles {a.cycles / c.cycles:.4f} energy "
                f"{a.energy_per_frame_j / c.energy_per_frame_j:.4f} | t analytic {t_a * 1e3:.0f} ms "
                f"cycle {t_c * 1e3:.0f} ms"
            )
        if name == "resnet50":
            r = simulate(graph, uniform(graph, 8))
            print(f"  vs NorthPole int8: fps {r.throughput_fps / 42_460:.3f}x, FPS/W {r.fps_per_w / 571:.3f}x")


if __name__ == "__main__":
    main(sys.argv[1:] or list(zoo.names()))
