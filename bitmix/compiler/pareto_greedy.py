"""Pareto-greedy allocation: AIMET AMP's phase 2 as shipped (Pandey et al. 2023), for any method's scores.

What AMP does (shared/reference/quantization.md §1.2–1.3, read from quic/aimet
`aimet_common/amp/{mixed_precision_algo,utils}.py`):

- Phase 1 gives one entry per (group, lower candidate): its sensitivity and its BOPs saving.
  Here a group is a free layer, a candidate a lower precision, the sensitivity the method's
  score and the saving `cost(all-highest) − cost(all-highest with that one flip)`.
- The entries are sorted once: least sensitive first; ties go to the milder flip (higher
  bits), then the larger saving, then the earlier layer. Cost only breaks ties: AIMET does
  not order by saving per unit of sensitivity. That order is a separate, labelled variant
  here (`order="cost-normalised"`), not AMP; it keeps only the entries that take a layer
  deeper than its earlier ones (`_deepening`).
- Point i of the Pareto curve applies entries 0..i−1 cumulatively to the all-highest
  baseline (point 0); a layer that appears twice takes its later entry. Nothing is
  interpolated between points.
- A binary search over the points, assuming they only get cheaper along the list, returns
  the first point (fewest flips, so the least predicted loss) that meets the budget; the
  budget is generally not filled, since the next cheaper assignment on the list may
  already be far below it. AMP's target is an accuracy drop; a cost budget is its mirror.

Costs are a callable `cost(assignment) -> float` of the whole assignment: `allocate`
passes the simulator's exact cycles (`CostModel.evaluate`), and checks every cap of the
budget on the exact evaluation of each probed point. `choices` narrows a layer's candidates
(highest first) where the cost model left some out (a layer that overflows a chip at 8 bits):
its highest fitting choice is the baseline's, and only its other fitting choices are flips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.targets import Target

Scores = dict[str, dict[int, float]]

CostFn = Callable[[dict[str, int]], float]
Choices = Mapping[str, Sequence[Precision]] | None  # per layer, its candidates highest first (None: the target's)
ORDERS = ("sensitivity", "cost-normalised")


@dataclass(frozen=True)
class Flip:
    """One phase-1 entry: lower `layer` to `bits`; its sensitivity and its saving on its own."""

    layer: str
    bits: Precision
    score: float
    saving: float


def flip_order(scores: Scores, target: Target, layer_names: Sequence[str], cost: CostFn,
               order: str = "sensitivity", choices: Choices = None) -> list[Flip]:
    """AMP's one cumulative order of (layer, lower precision) flips."""
    if order not in ORDERS:
        raise BitmixError(f"unknown pareto-greedy order {order!r}; valid: {', '.join(ORDERS)}")
    names = tuple(layer_names)
    base = _baseline(target, names, choices)
    base_cost = cost(base)
    pinned = target.pinned(names)
    entries = []
    for index, name in enumerate(n for n in names if n not in pinned):
        for bits in (target.choices if choices is None else choices[name])[1:]:
            if bits not in scores.get(name, {}):
                raise BitmixError(f"scores have no {bits}-bit value for layer {name!r}; re-run score()")
            flip = Flip(name, bits, float(scores[name][bits]), base_cost - cost(base | {name: bits}))
            higher_first = tuple(-k for k in as_precision(bits).key())
            if order == "sensitivity":
                key: tuple = (flip.score, higher_first, -flip.saving, index)
            else:  # score lost per unit of cost saved; flips that save nothing go last
                key = (flip.score / flip.saving if flip.saving > 0 else math.inf, higher_first, -flip.saving, index)
            entries.append((key, flip))
    ordered = [flip for _, flip in sorted(entries, key=lambda e: e[0])]
    return ordered if order == "sensitivity" else _deepening(ordered)


def _deepening(flips: list[Flip]) -> list[Flip]:
    """The cost-normalised order without the entries that would undo a layer's earlier, deeper flip.

    Ranked by score per unit saved, a layer's 2/2 can come before its 4/8; applied cumulatively, the
    later, milder entry would win and take back the saving, so the points' costs would climb again and the
    binary search (which assumes they only fall) would miss fitting points. AMP's own order does not need
    this: there the milder flip is also the less sensitive one and comes first."""
    deepest: dict[str, float] = {}
    kept = []
    for flip in flips:
        if flip.saving > deepest.get(flip.layer, 0.0):
            deepest[flip.layer] = flip.saving
            kept.append(flip)
    return kept


def point(target: Target, layer_names: Sequence[str], flips: Sequence[Flip], i: int,
          choices: Choices = None) -> dict[str, int]:
    """Pareto point i: the first i flips applied to the all-highest baseline (later entries win)."""
    assignment = _baseline(target, tuple(layer_names), choices)
    for flip in flips[:i]:
        assignment[flip.layer] = flip.bits
    return assignment


def search(n_points: int, fits: Callable[[int], bool]) -> int:
    """AMP's binary search: the first point that fits, assuming every later point fits too."""
    if fits(0):
        return 0
    lo, hi = 0, n_points - 1  # point lo misses; point hi is the cheapest on the list
    if not fits(hi):
        raise ValueError("no point fits")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def pareto_greedy(scores: Scores, cost: CostFn, fits: Callable[[dict[str, int]], bool], target: Target,
                  layer_names: Sequence[str], order: str = "sensitivity", choices: Choices = None) -> dict[str, int]:
    """The assignment AMP's phase 2 picks: the first point of the flip order that `fits` the budget."""
    names = tuple(layer_names)
    flips = flip_order(scores, target, names, cost, order, choices)
    probed: dict[int, bool] = {}

    def fits_point(i: int) -> bool:
        if i not in probed:
            probed[i] = fits(point(target, names, flips, i, choices))
        return probed[i]

    try:
        return point(target, names, flips, search(len(flips) + 1, fits_point), choices)
    except ValueError:
        base = cost(_baseline(target, names, choices))
        cheapest = min(cost(point(target, names, flips, i, choices)) for i in range(len(flips) + 1)) / base
        raise BitmixError(f"budget infeasible for pareto-greedy: its cheapest point costs {cheapest:.4f} of "
                          f"all-highest; raise the budget to at least {math.ceil(cheapest * 1e4) / 1e4:.4f}") from None


def _baseline(target: Target, names: tuple[str, ...], choices: Choices = None) -> dict[str, int]:
    if choices is not None:
        return {n: choices[n][0] for n in names}
    return {n: target.highest for n in names} | target.pinned(names)
