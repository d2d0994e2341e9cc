"""Analytic twin: closed-form cycles and energy per layer from the same mapping.

Cycles are `mapping.flow_cycles` on the busiest (ceil-sized) core with mean-distance
NoC latencies; action counts are summed over the mapping's real tiles. No per-core
stepping, so a whole ResNet-50 prices in milliseconds once its shapes are mapped.
"""

from __future__ import annotations

from bitmix.compiler.graph import LayerGraph
from bitmix.compiler.targets import Target
from bitmix.simulator.config import ChipConfig, load_chip_config
from bitmix.simulator.cost import CostTable, LayerCost
from bitmix.simulator.energy import count_actions, dynamic_energy, static_energy
from bitmix.simulator.mapping import (
    LayerWork,
    busiest_core,
    cores_of,
    flow_cycles,
    layer_cycles,
    layer_works,
    map_layer,
    stage_cycles,
    weight_bytes,
)
from bitmix.simulator.result import LayerEval


def evaluate_layer(work: LayerWork, bits: int, chip: ChipConfig) -> LayerEval:
    m = map_layer(work, bits, chip)
    busiest = busiest_core(work, m, chip)
    body = float(flow_cycles(busiest, chip, chip.mean_hops, chip.mean_hops, m.s_k - 1))
    counts = count_actions(work.gemm, work, bits, chip, cores_of(work, m, chip).work, chip.mean_hops,
                           chip.mean_hops)
    return LayerEval(work.layer.name, bits, layer_cycles(body, chip), stage_cycles(busiest, chip), counts, m)


def run(works: list[LayerWork], assignment: dict[str, int], chip: ChipConfig) -> list[LayerEval]:
    return [evaluate_layer(w, assignment[w.layer.name], chip) for w in works]


def price(graph: LayerGraph, target: Target, chip: ChipConfig | None = None) -> CostTable:
    """CostTable[layer][bits] for every precision the target allows, per frame.

    Each layer's energy includes static power over its own time, so summing a column
    gives a single-chip network's energy per frame; cycles sum to its latency.
    """
    chip = chip or load_chip_config(target.chip_config)
    works = layer_works(graph.layers, graph.vector_ops)
    frames = works[0].gemm.frames
    table: CostTable = {}
    for w in works:
        row = {}
        for bits in target.all_bits:
            ev = evaluate_layer(w, bits, chip)
            energy = sum(dynamic_energy(ev.counts, bits, chip.energy).values())
            energy += static_energy(ev.cycles / chip.clock_hz, chip.energy)
            row[bits] = LayerCost(ev.cycles / frames, energy / frames, weight_bytes(w.layer, bits))
        table[w.layer.name] = row
    return table
