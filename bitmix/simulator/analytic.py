"""Analytic twin: closed-form cycles and energy per layer from the same mapping.

Cycles are `mapping.flow_cycles` on the busiest (ceil-sized) core, with the longest
producer distance and the corner core's weight-home distance, or the next layer's
prefetch if longer; action counts are summed over
the mapping's real tiles. No per-core stepping, so a whole ResNet-50 prices in milliseconds once its shapes are mapped.
"""

from __future__ import annotations

from bitmix.ir.cost import CostTable, LayerCost
from bitmix.ir.graph import LayerGraph
from bitmix.ir.targets import Target
from bitmix.simulator.config import ChipConfig, load_chip_config
from bitmix.simulator.energy import count_actions, dynamic_energy, static_energy
from bitmix.simulator.mapping import (
    Cores,
    LayerWork,
    busiest_core,
    cores_of,
    flow_cycles,
    layer_works,
    map_layer,
    prefetch_cycles,
    producer_hops,
    stage_cycles,
    weight_bytes,
    weight_home_hops,
)
from bitmix.simulator.result import LayerEval


def evaluate_layer(work: LayerWork, bits: int, chip: ChipConfig, prev: Cores | None,
                   next_prefetch: float) -> tuple[LayerEval, Cores]:
    """One layer at `bits` after the layer mapped as `prev`; `next_prefetch` is the next
    layer's program + weight load time. Returns the layer's cores for its successor."""
    m = map_layer(work, bits, chip)
    cores = cores_of(work, m, chip)
    hops = producer_hops(cores, prev)
    busiest = busiest_core(work, m, chip)
    body = float(flow_cycles(busiest, chip, hops.max(), m.s_k - 1))
    counts = count_actions(work.gemm, work, bits, chip, cores.work, hops.mean(), chip.mean_hops)
    ev = LayerEval(work.layer.name, bits, max(body, next_prefetch), stage_cycles(busiest, chip), counts, m)
    return ev, cores


def prefetch(work: LayerWork, bits: int, chip: ChipConfig) -> float:
    busiest = busiest_core(work, map_layer(work, bits, chip), chip)
    return float(prefetch_cycles(busiest, chip, weight_home_hops(chip)))


def run(works: list[LayerWork], assignment: dict[str, int], chip: ChipConfig) -> list[LayerEval]:
    """Layers in order; the last one overlaps the prefetch of the next frame's first layer."""
    bits = [assignment[w.layer.name] for w in works]
    pre = [prefetch(w, b, chip) for w, b in zip(works, bits, strict=True)]
    evals = []
    prev = None
    for i, (w, b) in enumerate(zip(works, bits, strict=True)):
        ev, prev = evaluate_layer(w, b, chip, prev, pre[(i + 1) % len(works)])
        evals.append(ev)
    return evals


def price(graph: LayerGraph, target: Target, chip: ChipConfig | None = None) -> CostTable:
    """CostTable[layer][bits] for every precision the target allows, per frame.

    Each layer's energy includes static power over its own time, so a column sums to a
    single-chip network's latency and energy per frame. A layer's time covers the prefetch
    of the next layer, priced at the same precision (exact for uniform assignments;
    `simulate` uses the real neighbour).
    """
    chip = chip or load_chip_config(target.chip_config)
    works = layer_works(graph.layers, graph.vector_ops)
    frames = works[0].gemm.frames
    table: CostTable = {w.layer.name: {} for w in works}
    for bits in target.all_bits:
        for ev, w in zip(run(works, dict.fromkeys(graph.names, bits), chip), works, strict=True):
            energy = sum(dynamic_energy(ev.counts, bits, chip.energy).values())
            energy += static_energy(ev.cycles / chip.clock_hz, chip.energy)
            table[w.layer.name][bits] = LayerCost(ev.cycles / frames, energy / frames, weight_bytes(w.layer, bits))
    return {name: dict(sorted(row.items(), reverse=True)) for name, row in table.items()}
