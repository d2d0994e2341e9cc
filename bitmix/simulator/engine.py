"""Cycle-level engine: steps every core through every row block and every NoC transfer.

Per layer, for each used core (numpy arrays over cores, a Python loop over blocks):
- Activation NoC: the core's input arrives in row blocks, serialised on its link, after
  the hop latency from the core that produced that tile in the previous layer (the
  frame buffer edge for the first layer); a matmul's second operand comes first.
- Model NoC: the weight slice the core does not hold streams in after the hop latency
  from the core's weight homes; block 0 steps through the weight blocks as they land.
- MAC array: each block takes rows x lane passes cycles once its inputs are in.
- Partial-Sum NoC: non-root cores of a reduction chain send each block's partial sums
  towards the root, one hop per neighbour, serialised on the root's link.
- Vector unit: the root requantises and runs the attached vector ops per block.
The layer ends when the last core's vector unit drains (layers are sequential, as on
NorthPole), or when the next layer's program has arrived, if that is later.
"""

from __future__ import annotations

import numpy as np

from bitmix.simulator.config import ChipConfig
from bitmix.simulator.energy import count_actions
from bitmix.simulator.mapping import Cores, LayerWork, busiest_core, cores_of, layer_cycles, map_layer, stage_cycles
from bitmix.simulator.result import LayerEval


def _act_hops(cores: Cores, prev: Cores | None, chip: ChipConfig) -> np.ndarray:
    """Hops from the producer of each core's input tile (previous layer's chain root)."""
    if prev is None:
        return (cores.y + 1).astype(np.float64)  # the frame buffer feeds the array from row 0's edge
    s_g, s_p, s_k = (int(a.max()) + 1 for a in (cores.gi, cores.pi, cores.ki))
    pg, pp, pn = (int(a.max()) + 1 for a in (prev.gi, prev.pi, prev.ni))
    want_g = ((cores.gi + 0.5) / s_g * pg).astype(np.int64)
    want_p = ((cores.pi + 0.5) / s_p * pp).astype(np.int64)
    want_n = ((cores.ki + 0.5) / s_k * pn).astype(np.int64)
    roots = prev.ki == 0
    key = {(g, p, n): (x, y) for g, p, n, x, y in
           zip(prev.gi[roots], prev.pi[roots], prev.ni[roots], prev.x[roots], prev.y[roots], strict=True)}
    src = np.array([key[(g, p, n)] for g, p, n in zip(want_g, want_p, want_n, strict=True)])
    return (np.abs(cores.x - src[:, 0]) + np.abs(cores.y - src[:, 1])).astype(np.float64)


def _model_hops(cores: Cores, chip: ChipConfig) -> np.ndarray:
    """Mean hops from a core to the weight homes, which are spread evenly over the array."""
    xs = np.arange(chip.cores_x)
    ys = np.arange(chip.cores_y)
    dx = np.abs(cores.x[:, None] - xs[None, :]).mean(axis=1)
    dy = np.abs(cores.y[:, None] - ys[None, :]).mean(axis=1)
    return dx + dy


def simulate_layer(work: LayerWork, bits: int, chip: ChipConfig, prev: Cores | None) -> tuple[LayerEval, Cores]:
    m = map_layer(work, bits, chip)
    cores = cores_of(work, m, chip)
    cw = cores.work
    act_hops = _act_hops(cores, prev, chip)
    model_hops = _model_hops(cores, chip)
    n = cw.rows.shape[0]
    nblk = np.maximum(1, -(-cw.rows // chip.pipeline_rows))
    a = cw.in_bits / chip.noc_act.width_bits / nblk
    c = cw.compute / nblk
    ps = cw.psum_bits / chip.noc_psum.width_bits / nblk
    v = cw.vector_ops / chip.vector_ops_per_cycle / nblk
    act_start = act_hops * chip.noc_act.hop_cycles + cw.operand_bits / chip.noc_act.width_bits
    w_start = model_hops * chip.noc_model.hop_cycles
    w_total = cw.stream_bits / chip.noc_model.width_bits
    wblocks = np.maximum(cw.blocks, 1)

    # Block 0 waits for its inputs, then steps through the weight blocks as they stream in.
    t = act_start + a
    for i in range(int(wblocks.max())):
        live = i < wblocks
        landed = w_start + (i + 1) * w_total / wblocks
        t = np.where(live, np.maximum(t, landed) + c / wblocks, t)
    mac_end = t
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
    return LayerEval(work.layer.name, bits, layer_cycles(body, chip), stages, counts, m), cores


def run(works: list[LayerWork], assignment: dict[str, int], chip: ChipConfig) -> list[LayerEval]:
    """Simulate the layers in execution order (each layer's inputs come from the one before)."""
    evals = []
    prev = None
    for w in works:
        ev, prev = simulate_layer(w, assignment[w.layer.name], chip, prev)
        evals.append(ev)
    return evals
