"""price: the analytic engine's whole-model cost as unary + pairwise terms (a `CostModel`).

Each layer is placed once per precision (`analytic.place`), each producer/consumer pair
of precisions gets its lead latency and action counts (`analytic.entry`), and each
layer/next-layer pair its `max(core, next prefetch)`: exactly the pieces `analytic.run`
adds up, so Σ terms equals `simulate()` for every assignment (tests/simulator/test_costmodel.py).
"""

from __future__ import annotations

import numpy as np

from bitmix.errors import BitmixError
from bitmix.ir.cost import ChipLimits, CostModel, fits_one_chip, pack_stages, size_text
from bitmix.ir.graph import LayerGraph
from bitmix.ir.precision import Precision
from bitmix.ir.targets import Target
from bitmix.simulator.analytic import entry, place
from bitmix.simulator.config import ChipConfig, load_chip_config
from bitmix.simulator.energy import dynamic_energy, static_energy
from bitmix.simulator.mapping import layer_works, weight_bytes
from bitmix.simulator.multichip import activation_bytes, input_bytes, program_bytes


def layer_choices(graph: LayerGraph, target: Target) -> tuple[tuple[Precision, ...], ...]:
    """Per layer, the precisions it may take: the target's choices, or its pinned bits."""
    pinned = target.pinned(graph.names)
    return tuple((pinned[n],) if n in pinned else target.choices for n in graph.names)


def price(graph: LayerGraph, target: Target, chip: ChipConfig | None = None) -> CostModel:
    """The CostModel of `graph` on `target` (pinned layers get their pinned bits only).

    A choice at which a layer alone overflows one chip (weights, program and activations: a layer
    is never split over chips) is left out of that layer's choices and listed in `unfit`."""
    chip = chip or load_chip_config(target.chip_config)
    works = layer_works(graph.layers, graph.vector_ops)
    choices, unfit = _fitting_choices(works, layer_choices(graph, target), chip)
    n, frames, f = len(works), graph.frames or works[0].gemm.frames, chip.clock_hz
    placed = [[place(w, b, chip) for b in opts] for w, opts in zip(works, choices, strict=True)]

    def joules(counts, bits: Precision, cycles: float) -> float:
        return sum(dynamic_energy(counts, bits, chip.energy).values()) + static_energy(cycles / f, chip.energy)

    enter, enter_j = [], []
    for i, row in enumerate(placed):
        prevs = [None] if i == 0 else [p.cores for p in placed[i - 1]]
        lead = np.zeros((len(prevs), len(row)))
        dyn = np.zeros_like(lead)
        for a, prev in enumerate(prevs):
            for b, p in enumerate(row):
                lead[a, b], counts = entry(p, chip, prev)
                dyn[a, b] = joules(counts, p.bits, lead[a, b])
        enter.append(lead)
        enter_j.append(dyn)
    fed = [[(p, *entry(p, chip, None)) for p in row] for row in placed[1:]]  # a chip's first layer: frame buffer
    fresh = [enter[0][0]] + [np.array([lead for _, lead, _ in row]) for row in fed]
    fresh_j = [enter_j[0][0]] + [np.array([joules(counts, p.bits, lead) for p, lead, counts in row]) for row in fed]
    hold = [np.array([[max(p.core, q.prefetch) for q in placed[(i + 1) % n]] for p in row])
            for i, row in enumerate(placed)]
    hold_j = [static_energy(h / f, chip.energy) for h in hold]
    cyc_u = [enter[0][0] / frames] + [np.zeros(len(c)) for c in choices[1:]]
    eng_u = [enter_j[0][0] / frames] + [np.zeros(len(c)) for c in choices[1:]]
    cyc_p = tuple((hold[i] + (enter[i + 1] if i + 1 < n else 0.0)) / frames for i in range(n))
    eng_p = tuple((hold_j[i] + (enter_j[i + 1] if i + 1 < n else 0.0)) / frames for i in range(n))
    if n == 1:  # the layer overlaps its own next-frame prefetch: a unary term
        cyc_u[0] = cyc_u[0] + np.diag(cyc_p[0])
        eng_u[0] = eng_u[0] + np.diag(eng_p[0])
        cyc_p, eng_p = (np.zeros((len(choices[0]),) * 2),), (np.zeros((len(choices[0]),) * 2),)
    wbytes = tuple(np.array([weight_bytes(w.layer, b) for b in opts]) for w, opts in zip(works, choices, strict=True))
    abytes = tuple(np.array([activation_bytes(w, b) for b in opts]) for w, opts in zip(works, choices, strict=True))
    limits = ChipLimits(chip.sram_bytes, program_bytes(chip), chip.pcie.latency_s, chip.pcie.bandwidth_bytes_s,
                        8 * chip.energy.lookup("pcie", "transfer"), chip.energy.static_power_w, f)
    return CostModel(
        names=tuple(w.layer.name for w in works), choices=choices, frames=frames,
        unary={"cycles": tuple(cyc_u), "energy_j": tuple(eng_u), "sram_bytes": tuple(w.astype(float) for w in wbytes)},
        pair={"cycles": cyc_p, "energy_j": eng_p, "sram_bytes": tuple(np.zeros_like(p) for p in cyc_p)},
        enter=tuple(enter), hold=tuple(hold), weight_bytes=wbytes, act_bytes=abytes,
        xfer_bytes=tuple(np.array([input_bytes(w, b) for b in opts]) for w, opts in zip(works, choices, strict=True)),
        chip=limits, one_chip=_always_one_chip(wbytes, abytes, limits), unfit=unfit,
        fresh=tuple(fresh), fresh_j=tuple(fresh_j), enter_j=tuple(enter_j),
        core=tuple(np.array([p.core for p in row]) for row in placed),
        prefetch=tuple(np.array([p.prefetch for p in row]) for row in placed),
    )


def _fitting_choices(works, offered, chip: ChipConfig) -> tuple[tuple[tuple[Precision, ...], ...],
                                                               tuple[tuple[Precision, ...], ...]]:
    """Per layer, the offered choices at which it fits one chip by itself, and those at which it does not."""
    sram, programs = chip.sram_bytes, program_bytes(chip)
    kept, dropped = [], []
    for w, opts in zip(works, offered, strict=True):
        need = {b: (weight_bytes(w.layer, b), activation_bytes(w, b)) for b in opts}
        fit = tuple(b for b in opts if fits_one_chip(*need[b], sram, programs))
        if not fit:
            b = min(opts, key=lambda c: sum(need[c]))
            wb, ab = need[b]
            at = f"even at its narrowest, {b}," if len(opts) > 1 else f"at {b}"
            raise BitmixError(
                f"layer {w.layer.name!r} fits one chip at none of its choices: {at} it needs {size_text(wb)} "
                f"of weights plus {size_text(ab)} of activations, but one chip has {size_text(sram)} (cores x "
                f"core_sram_bytes) and a layer's program takes {size_text(programs)}; raise chip.core_sram_bytes "
                "or the core count (a layer is never split over chips)")
        kept.append(fit)
        dropped.append(tuple(b for b in opts if b not in fit))
    return tuple(kept), tuple(dropped)


def _always_one_chip(wbytes, abytes, chip: ChipLimits) -> bool:
    """Weights and activations shrink with bits, so if the largest choices fit one chip, all do."""
    widest = [int(w.max()) for w in wbytes]
    act = max(int(a.max()) for a in abytes)
    try:
        return len(pack_stages(widest, [act] * len(widest), chip.sram_bytes, chip.program_bytes)) == 1
    except BitmixError:  # a layer too big at its widest choice: not always one chip
        return False
