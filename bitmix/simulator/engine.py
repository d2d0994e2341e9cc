"""Cycle-level engine: steps every core through every row block and every NoC transfer.

Per layer, for each used core (numpy arrays over cores, a Python loop over blocks):
- Activation NoC: the core's input arrives in row blocks, serialised on its link, after
  the hop latency from the core that produced that tile in the previous layer (the
  frame buffer edge for the first layer); a matmul's second operand comes first.
- Model and Instruction NoCs: the weight slice the core does not hold, and the layer's
  program, stream in while the previous layer runs, after the hop latency from the
  weight homes (spread over the array) or the array corner.
- MAC array: each block takes rows x lane passes cycles once its inputs are in.
- Partial-Sum NoC: non-root cores of a reduction chain send each block's partial sums
  towards the root, one hop per neighbour, serialised on the root's link.
- Vector unit: the root requantises and runs the attached vector ops per block.
The layer ends when the last core's vector unit drains (layers are sequential, as on
NorthPole), or when the next layer's program and weights have landed, if that is later;
they start streaming once every core of this layer has its first input block (after the
longest producer hop latency), as in the analytic engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from bitmix.ir.precision import Precision
from bitmix.simulator.config import ChipConfig
from bitmix.simulator.energy import count_actions
from bitmix.simulator.mapping import (
    Cores,
    LayerWork,
    act_start_cycles,
    at_precision,
    block_stages,
    busiest_core,
    cores_of,
    map_layer,
    prefetch_cycles,
    producer_hops,
    stage_cycles,
)
from bitmix.simulator.result import LayerEval


def _model_hops(cores: Cores, chip: ChipConfig) -> np.ndarray:
    """Mean hops from a core to the weight homes, which are spread evenly over the array."""
    dx = np.abs(cores.x[:, None] - np.arange(chip.cores_x)[None, :]).mean(axis=1)
    dy = np.abs(cores.y[:, None] - np.arange(chip.cores_y)[None, :]).mean(axis=1)
    return dx + dy


def simulate_layer(work: LayerWork, bits: Precision | int, chip: ChipConfig, prev: Cores | None
                   ) -> tuple[LayerEval, Cores, float]:
    """One layer after the layer mapped as `prev`; also returns its lead (longest producer hop latency)."""
    m = map_layer(work, bits, chip)
    bits = m.bits
    work = at_precision(work, bits)
    cores = cores_of(work, m, chip)
    cw = cores.work
    act_hops = producer_hops(cores, prev)
    model_hops = _model_hops(cores, chip)
    n = cw.rows.shape[0]
    nblk, a, c, ps, v = block_stages(cw, chip)
    act_start = act_start_cycles(cw, chip, act_hops)
    mac_end = act_start + a + c
    chain = np.arange(n) % m.s_k  # position along the partial-sum chain (0 = root)
    hop_p = chip.noc_psum.hop_cycles
    roots = chain == 0
    reduced = np.zeros(int(roots.sum()))
    vec_end = np.zeros_like(reduced)
    for j in range(int(nblk.max())):
        live = j < nblk
        if j:
            arrived = act_start + (j + 1) * a
            mac_end = np.where(live, np.maximum(arrived, mac_end) + c, mac_end)
        done = np.where(live, mac_end, 0.0)
        if m.s_k > 1:  # partial sums ripple to the root: each hop adds latency, the root link serialises
            ready = (done + chain * hop_p).reshape(-1, m.s_k).max(axis=1)
            link = ps.reshape(-1, m.s_k).max(axis=1)
            reduced = np.where(live[roots], np.maximum(reduced, ready) + link, reduced)
        else:
            reduced = done[roots]
        vec_end = np.where(live[roots], np.maximum(vec_end, reduced) + v[roots], vec_end)
    body = float(vec_end.max()) + chip.mac_latency_cycles + chip.vector_latency_cycles
    counts = count_actions(work.gemm, work, bits, chip, cw, act_hops, model_hops)
    stages = stage_cycles(busiest_core(work, m, chip), chip)
    lead = float(act_hops.max()) * chip.noc_act.hop_cycles
    return LayerEval(work.layer.name, bits, body, stages, counts, m), cores, lead


def _prefetch(cores: Cores, chip: ChipConfig) -> float:
    """Program broadcast and weight streams of every core; the last to land sets the time."""
    return float(prefetch_cycles(cores.work, chip, _model_hops(cores, chip)).max())


def run(works: list[LayerWork], assignment: dict[str, Precision], chip: ChipConfig,
        stages: Sequence[tuple[int, int]] = ()) -> list[LayerEval]:
    """Simulate the layers in execution order, chip by chip (`stages`: (start, stop) spans; none: one chip).

    Each layer's inputs come from the one before on its chip (a chip's first layer reads the frame
    buffer). A layer lasts until its own cores drain and the next layer's program and weights have
    landed; a chip's last layer overlaps the prefetch of its own first layer for the next run.
    """
    evals: list[LayerEval] = []
    for start, stop in stages or [(0, len(works))]:
        bodies: list[LayerEval] = []
        leads: list[float] = []
        prefetches: list[float] = []
        prev = None
        for w in works[start:stop]:
            ev, prev, lead = simulate_layer(w, assignment[w.layer.name], chip, prev)
            bodies.append(ev)
            leads.append(lead)
            prefetches.append(_prefetch(prev, chip))
        evals += [replace(ev, cycles=max(ev.cycles, leads[i] + prefetches[(i + 1) % len(bodies)]))
                  for i, ev in enumerate(bodies)]
    return evals
