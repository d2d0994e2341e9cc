"""Random allocation instances whose costs couple consecutive layers the way the simulator's do."""

from __future__ import annotations

import itertools

import numpy as np

from bitmix.ir.cost import CostModel
from bitmix.ir.targets import Target


def random_instance(rng: np.random.Generator, n_layers: int, target: Target) -> tuple[tuple[str, ...], CostModel, dict]:
    """Per layer a compute time shrinking with bits and a prefetch time; edge i costs
    max(core_i, prefetch_{i+1}) plus a producer-hop term, as in `bitmix.simulator.analytic`."""
    names = tuple(f"l{i}" for i in range(n_layers))
    pinned = target.pinned(names)
    choices = [(pinned[n],) if n in pinned else target.choices for n in names]
    core = [np.array([rng.uniform(1e3, 1e5) * (b.compute / 8) ** rng.uniform(0.3, 1.0) for b in c]) for c in choices]
    pre = [np.array([rng.uniform(0, 6e4) * b.w / 8 for b in c]) for c in choices]
    hop = [rng.uniform(0, 300, size=(len(choices[i - 1]), len(c))) for i, c in enumerate(choices)]
    nxt = [(i + 1) % n_layers for i in range(n_layers)]
    cycles_pair = [np.maximum(core[i][:, None], pre[nxt[i]][None, :]) + (hop[nxt[i]] if nxt[i] else 0.0)
                   for i in range(n_layers)]
    energy = [c * 1e-12 * rng.uniform(0.5, 2) for c in core]
    energy_pair = [p * 1e-13 for p in cycles_pair]
    sram = [np.array([rng.uniform(1e3, 1e5) * b.w for b in c]).round() for c in choices]
    model = CostModel.of_terms(names, choices, {"cycles": [np.zeros(len(c)) for c in choices], "energy_j": energy,
                                                "sram_bytes": sram},
                               {"cycles": cycles_pair, "energy_j": energy_pair})
    scores = {}
    for name, c in zip(names, choices, strict=True):
        if name not in pinned:
            drops = np.cumsum(rng.exponential(1.0, len(c)))
            scores[name] = {b: float(d - drops[0]) for b, d in zip(c, drops, strict=True)}
    return names, model, scores


def brute_force(model: CostModel, scores: dict, caps: dict[str, float]) -> tuple[float, list[int] | None]:
    """min Σ score over every assignment whose exact cost meets every cap."""
    best, arg = np.inf, None
    for choice in itertools.product(*(range(len(c)) for c in model.choices)):
        ev = model.evaluate(choice)
        if all(ev.value(r) <= cap * (1 + 1e-12) for r, cap in caps.items()):
            s = sum(scores.get(n, {}).get(c[j], 0.0) for n, c, j in zip(model.names, model.choices, choice,
                                                                          strict=True))
            if s < best:
                best, arg = s, list(choice)
    return best, arg
