"""Analytic twin: closed-form cycles and energy per layer from the same mapping.

A layer's cycles are `lead + max(core, next_prefetch)`: `lead` is the hop latency of its
first input block from the farthest producer core (the previous layer's chain roots), the
one term that depends on the previous layer's mapping; `core` is `mapping.flow_cycles` on
the busiest (ceil-sized) core from that point on; the next layer's program and weights
stream in once every core has started (after `lead`), so only a prefetch longer than
`core` costs time. Action counts are summed over the mapping's real tiles. These pieces
are also what `costmodel.price` tabulates, so its terms sum to this engine's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bitmix.ir.precision import Precision
from bitmix.simulator.config import ChipConfig
from bitmix.simulator.energy import ActionCounts, count_actions
from bitmix.simulator.mapping import (
    Cores,
    CoreWork,
    LayerWork,
    Mapping,
    at_precision,
    busiest_core,
    cores_of,
    flow_cycles,
    map_layer,
    prefetch_cycles,
    producer_hops,
    stage_cycles,
    weight_home_hops,
)
from bitmix.simulator.result import LayerEval


@dataclass(frozen=True)
class Placed:
    """One layer mapped at one precision: what does not depend on its neighbours."""

    work: LayerWork
    bits: Precision
    mapping: Mapping
    cores: Cores
    busiest: CoreWork
    core: float  # body cycles after the first input block's hop latency
    prefetch: float  # program + weight-slice load time, overlapped with the previous layer


def place(work: LayerWork, bits: Precision | int, chip: ChipConfig) -> Placed:
    m = map_layer(work, bits, chip)
    bits = m.bits
    work = at_precision(work, bits)
    busiest = busiest_core(work, m, chip)
    core = float(flow_cycles(busiest, chip, 0.0, m.s_k - 1))
    pre = float(prefetch_cycles(busiest, chip, weight_home_hops(chip)))
    return Placed(work, bits, m, cores_of(work, m, chip), busiest, core, pre)


def entry(p: Placed, chip: ChipConfig, prev: Cores | None) -> tuple[float, ActionCounts]:
    """Lead cycles and action counts of a layer fed by the layer mapped as `prev` (None: frame buffer)."""
    hops = producer_hops(p.cores, prev)
    lead = float(hops.max()) * chip.noc_act.hop_cycles
    counts = count_actions(p.work.gemm, p.work, p.bits, chip, p.cores.work, hops.mean(), chip.mean_hops)
    return lead, counts


def run(works: list[LayerWork], assignment: dict[str, Precision], chip: ChipConfig,
        stages: Sequence[tuple[int, int]] = ()) -> list[LayerEval]:
    """Layers in order, chip by chip (`stages`: (start, stop) spans; none: one chip). A chip's first layer
    reads its input from the frame buffer (it arrives over PCIe); its last overlaps the prefetch of its own
    first layer for the next run, as the one chip's last layer does for the model's first."""
    placed = [place(w, assignment[w.layer.name], chip) for w in works]
    evals = []
    for start, stop in stages or [(0, len(placed))]:
        prev = None
        for i in range(start, stop):
            p = placed[i]
            lead, counts = entry(p, chip, prev)
            cycles = lead + max(p.core, placed[i + 1 if i + 1 < stop else start].prefetch)
            evals.append(LayerEval(p.work.layer.name, p.bits, cycles, stage_cycles(p.busiest, chip), counts,
                                   p.mapping))
            prev = p.cores
    return evals
