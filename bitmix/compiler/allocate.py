"""allocate: per-layer precisions as a multiple-choice knapsack over simulated costs.

One precision per non-pinned layer; minimise the summed sensitivity score subject to
the summed simulator cost staying within the budget. With one constraint the problem
is solved by dynamic programming over integer-scaled costs, run twice: with costs
rounded up (every solution it returns is truly feasible) and rounded down (its
optimum bounds the true optimum from below), so the reported `gap` is a proof, and
it is 0 whenever the rounded-down solution is itself feasible. Several constraints
at once (cycles, energy, SRAM bytes) go to an exact ILP (`scipy.optimize.milp`, HiGHS).

Baselines live here too: `uniform` (the best single precision that fits) and
`random_feasible` (random descents from all-highest until the budget is met).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bitmix.errors import BitmixError
from bitmix.ir.cost import CostTable, LayerCost
from bitmix.ir.targets import Target

Scores = dict[str, dict[int, float]]
RESOURCES = ("cycles", "energy_j", "sram_bytes")
STRATEGIES = ("knapsack", "pareto-greedy", "pareto-greedy-normalised", "uniform", "random")
DP_RESOLUTION = 4096  # integer cost units between the cheapest and the budgeted cost
PARETO_LIMIT = 200_000  # states the exact gap-closing pass may keep before giving up


@dataclass(frozen=True)
class Budget:
    """What the assignment may cost: a fraction of the all-highest cycles and/or absolute caps.

    `fraction` = 1.0 is the cost of every non-pinned layer at the target's highest
    choice (pinned layers at their pinned bits), counted in simulated cycles.
    """

    fraction: float | None = None
    cycles: float | None = None
    energy_j: float | None = None
    sram_bytes: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if not given:
            raise BitmixError("budget is empty; give a fraction (e.g. 0.75) or a cap on cycles, energy_j or sram_bytes")
        for key, value in given.items():
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise BitmixError(f"budget {key}={value!r} must be a positive number")

    def caps(self, reference_cycles: float) -> dict[str, float]:
        """Absolute caps per resource, the fraction resolved against the all-highest cycles."""
        caps = {r: float(getattr(self, r)) for r in RESOURCES if getattr(self, r) is not None}
        if self.fraction is not None:
            caps["cycles"] = min(caps.get("cycles", math.inf), self.fraction * reference_cycles)
        return caps


@dataclass(frozen=True)
class Allocation:
    """A chosen precision per layer (pinned ones included) and what it scores and costs."""

    assignment: dict[str, int] = field(hash=False)
    objective: float  # summed scores of the non-pinned layers
    cost: LayerCost  # totals over all layers
    fraction: float  # cost.cycles / all-highest cycles
    gap: float  # proven bound on objective - optimum (0 = optimal)
    solver: str  # "dp", "ilp", "uniform" or "random"
    solve_s: float = field(default=0.0, compare=False)  # wall time, excluded from equality


@dataclass(frozen=True)
class _Problem:
    """The knapsack in arrays: per free layer, options (bits, score, cost per resource)."""

    names: tuple[str, ...]
    free: tuple[str, ...]
    bits: tuple[tuple[int, ...], ...]
    scores: tuple[np.ndarray, ...]
    costs: dict[str, tuple[np.ndarray, ...]]
    pinned: dict[str, int]
    fixed: dict[str, float]  # cost of the pinned layers per resource
    reference: float  # all-highest cycles


def allocate(
    scores: Scores,
    costs: CostTable,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    solver: str = "auto",
    strategy: str = "knapsack",
    seed: int = 0,
) -> Allocation:
    """The precision assignment that minimises Σ score within `budget` (or a baseline strategy).

    `solver` is "auto" (DP for one constraint, ILP for several), "dp" or "ilp".
    `strategy` "uniform" / "random" dispatch to the baselines of the same names, "pareto-greedy"
    ("-normalised") to AIMET AMP's search (`bitmix.compiler.pareto_greedy`).
    """
    if strategy.startswith("pareto-greedy") and strategy in STRATEGIES:
        from bitmix.compiler.pareto_greedy import pareto_greedy

        order = "cost-normalised" if strategy.endswith("normalised") else "sensitivity"
        return pareto_greedy(scores, costs, target, layer_names, budget, order)
    if strategy == "uniform":
        return uniform(costs, target, layer_names, budget, scores)
    if strategy == "random":
        return random_feasible(costs, target, layer_names, budget, seed, scores)
    if strategy != "knapsack":
        raise BitmixError(f"unknown allocation strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    problem = _problem(scores, costs, target, layer_names)
    caps = budget.caps(problem.reference)
    _check_feasible(problem, caps)
    if solver not in ("auto", "dp", "ilp"):
        raise BitmixError(f"unknown solver {solver!r}; use auto, dp or ilp")
    if solver == "dp" and len(caps) > 1:
        raise BitmixError("the DP solver handles one constraint; use solver='ilp' (or 'auto') for several caps")
    start = time.perf_counter()
    if solver == "ilp" or (solver == "auto" and len(caps) > 1):
        choice, gap, name = _solve_ilp(problem, caps), 0.0, "ilp"
    else:
        ((resource, cap),) = caps.items()
        choice, gap = _solve_dp(problem, resource, cap)
        name = "dp"
    return _allocation(problem, choice, costs, gap, name, time.perf_counter() - start)


def frontier(
    scores: Scores,
    costs: CostTable,
    target: Target,
    layer_names: Sequence[str],
    fractions: Sequence[float] | None = None,
) -> list[Allocation]:
    """The Pareto set (cost vs summed score) over budget fractions, cheapest first.

    Fractions below the cheapest achievable assignment are skipped; by default 21
    fractions span the cheapest assignment to all-highest.
    """
    problem = _problem(scores, costs, target, layer_names)
    lowest = _min_cost(problem, "cycles") / problem.reference
    if fractions is None:
        fractions = list(np.linspace(lowest, 1.0, 21))
    feasible = [f for f in fractions if f * problem.reference >= _min_cost(problem, "cycles") * (1 - 1e-12)]
    if not feasible:
        raise BitmixError(f"no fraction reaches the cheapest assignment; use fractions >= {lowest:.4f}")
    found = [allocate(scores, costs, target, layer_names, Budget(fraction=f)) for f in sorted(feasible)]
    pareto: list[Allocation] = []
    for alloc in sorted(found, key=lambda a: (a.cost.cycles, a.objective)):
        if not pareto or alloc.objective < pareto[-1].objective - 1e-12:
            pareto.append(alloc)
    return pareto


def uniform(
    costs: CostTable,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    scores: Scores | None = None,
) -> Allocation:
    """The highest single precision (for all non-pinned layers) that fits the budget."""
    problem = _problem(scores or {}, costs, target, layer_names, require_scores=False)
    caps = budget.caps(problem.reference)
    _check_feasible(problem, caps)
    for bits in target.choices:
        choice = [b.index(bits) for b in problem.bits]
        if _fits(problem, choice, caps):
            return _allocation(problem, choice, costs, 0.0, "uniform", 0.0)
    raise BitmixError(
        f"no single precision in {list(target.choices)} fits the budget; "
        "raise the budget or use a mixed-precision method (e.g. eagl)"
    )


def random_feasible(
    costs: CostTable,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    seed: int,
    scores: Scores | None = None,
) -> Allocation:
    """A random assignment that fills the budget: from all-highest, lower random layers until it fits.

    Each step lowers one uniformly chosen layer by one choice, so the result sits just
    under the budget like a knapsack solution does, without using any score.
    """
    problem = _problem(scores or {}, costs, target, layer_names, require_scores=False)
    caps = budget.caps(problem.reference)
    _check_feasible(problem, caps)
    rng = random.Random(seed)
    choice = [0] * len(problem.free)
    while not _fits(problem, choice, caps):
        lowerable = [i for i, c in enumerate(choice) if c + 1 < len(problem.bits[i])]
        i = rng.choice(lowerable)
        choice[i] += 1
    return _allocation(problem, choice, costs, 0.0, "random", 0.0)


def _problem(
    scores: Scores, costs: CostTable, target: Target, layer_names: Sequence[str], require_scores: bool = True
) -> _Problem:
    names = tuple(layer_names)
    if not names:
        raise BitmixError("no layers to allocate")
    pinned = target.pinned(names)
    free = tuple(n for n in names if n not in pinned)
    for name in names:
        needed = [pinned[name]] if name in pinned else list(target.choices)
        missing = [b for b in needed if b not in costs.get(name, {})]
        if missing:
            raise BitmixError(f"cost table has no {missing[0]}-bit price for layer {name!r}; re-run price()")
    if require_scores:
        for name in free:
            missing = [b for b in target.choices if b not in scores.get(name, {})]
            if missing:
                raise BitmixError(f"scores have no {missing[0]}-bit value for layer {name!r}; re-run score()")
    bits = tuple(target.choices for _ in free)
    score_arrays = tuple(
        np.array([float(scores.get(n, {}).get(b, 0.0)) for b in target.choices]) for n in free
    )
    cost_arrays = {
        r: tuple(np.array([float(getattr(costs[n][b], r)) for b in target.choices]) for n in free)
        for r in RESOURCES
    }
    fixed = {r: sum(float(getattr(costs[n][b], r)) for n, b in pinned.items()) for r in RESOURCES}
    reference = fixed["cycles"] + sum(float(c[0]) for c in cost_arrays["cycles"])
    if reference <= 0:
        raise BitmixError("the all-highest assignment costs 0 cycles; the cost table is empty or broken")
    return _Problem(names, free, bits, score_arrays, cost_arrays, pinned, fixed, reference)


def _min_cost(problem: _Problem, resource: str) -> float:
    return problem.fixed[resource] + sum(float(c.min()) for c in problem.costs[resource])


def _check_feasible(problem: _Problem, caps: dict[str, float]) -> None:
    """Raise with the cheapest achievable cost when a cap cannot be met."""
    for resource, cap in caps.items():
        lowest = _min_cost(problem, resource)
        if lowest > cap * (1 + 1e-12):
            if resource == "cycles":
                least = math.ceil(lowest / problem.reference * 1e4) / 1e4
                raise BitmixError(
                    f"budget of {cap:.6g} cycles ({cap / problem.reference:.4f} of all-highest) is infeasible; "
                    f"the minimum achievable is {lowest:.6g} cycles ({lowest / problem.reference:.4f}): "
                    f"ask for a budget of at least {least:.4f}"
                )
            raise BitmixError(
                f"budget of {cap:.6g} {resource} is infeasible; the minimum achievable is {lowest:.6g} {resource}: "
                f"relax that limit"
            )


def _fits(problem: _Problem, choice: Sequence[int], caps: dict[str, float]) -> bool:
    return all(
        problem.fixed[r] + sum(float(c[j]) for c, j in zip(problem.costs[r], choice, strict=True))
        <= cap * (1 + 1e-12)
        for r, cap in caps.items()
    )


def _solve_dp(problem: _Problem, resource: str, cap: float) -> tuple[list[int], float]:
    """Exact up to cost scaling; returns (choice per free layer, proven optimality gap)."""
    if not problem.free:
        return [], 0.0
    base = [c.min() for c in problem.costs[resource]]
    extra = [c - b for c, b in zip(problem.costs[resource], base, strict=True)]
    capacity = cap - problem.fixed[resource] - float(sum(base))
    span = float(sum(e.max() for e in extra))
    if span <= capacity * (1 + 1e-12):  # everything fits: best score per layer
        return [int(np.argmin(s)) for s in problem.scores], 0.0
    resolution = DP_RESOLUTION if capacity > 0 else 0
    unit = capacity / resolution if resolution else 1.0
    up = [np.minimum(np.ceil(e / unit), resolution + 1).astype(np.int64) for e in extra]
    down = [np.minimum(np.floor(e / unit), resolution + 1).astype(np.int64) for e in extra]
    upper, up_choice = _dp(problem.scores, up, resolution)
    lower, low_choice = _dp(problem.scores, down, resolution)
    if sum(float(e[j]) for e, j in zip(extra, low_choice, strict=True)) <= capacity * (1 + 1e-12):
        return low_choice, 0.0  # the relaxation's optimum is feasible, hence optimal
    exact = _pareto_dp(problem.scores, extra, capacity, upper)
    if exact is not None:
        return exact, 0.0
    return up_choice, max(0.0, upper - lower)


def _pareto_dp(
    scores: Sequence[np.ndarray], extra: Sequence[np.ndarray], capacity: float, upper: float
) -> list[int] | None:
    """Exact DP over real costs: non-dominated (cost, score) states, pruned by the bound `upper`.

    Closes the gap the scaled DP leaves when many assignments sit within one cost
    unit of the budget. Returns None if the state set outgrows `PARETO_LIMIT`.
    """
    rest = np.concatenate([np.cumsum([float(s.min()) for s in scores[::-1]])[::-1], [0.0]])
    bound = upper + 1e-12 * max(1.0, abs(upper))
    cost, score = np.zeros(1), np.zeros(1)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (s, e) in enumerate(zip(scores, extra, strict=True)):
        c = (cost[:, None] + e[None, :]).ravel()
        sc = (score[:, None] + s[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(s))
        pick = np.tile(np.arange(len(s)), len(cost))
        keep = (c <= capacity * (1 + 1e-12)) & (sc + rest[i + 1] <= bound)
        order = np.lexsort((sc[keep], c[keep]))
        c, sc, parent, pick = c[keep][order], sc[keep][order], parent[keep][order], pick[keep][order]
        front = np.ones(len(c), dtype=bool)
        front[1:] = sc[1:] < np.minimum.accumulate(sc)[:-1]  # strictly better than every cheaper state
        cost, score = c[front], sc[front]
        history.append((parent[front], pick[front]))
        if len(cost) > PARETO_LIMIT or not len(cost):
            return None
    k = int(np.argmin(score))
    choice = [0] * len(scores)
    for i in range(len(scores) - 1, -1, -1):
        parents, picks = history[i]
        choice[i] = int(picks[k])
        k = int(parents[k])
    return choice


def _dp(scores: Sequence[np.ndarray], weights: Sequence[np.ndarray], slots: int) -> tuple[float, list[int]]:
    """min Σ score s.t. Σ weight <= slots, one option per layer; O(layers · options · slots)."""
    best = np.zeros(slots + 1)
    picks = np.empty((len(scores), slots + 1), dtype=np.int16)
    for i, (s, w) in enumerate(zip(scores, weights, strict=True)):
        new = np.full(slots + 1, np.inf)
        pick = np.zeros(slots + 1, dtype=np.int16)
        for j in range(len(s)):
            wj = int(w[j])
            if wj > slots:
                continue
            cand = best[: slots + 1 - wj] + s[j]
            better = cand < new[wj:]
            new[wj:][better] = cand[better]
            pick[wj:][better] = j
        best, picks[i] = new, pick
    choice = [0] * len(scores)
    k = slots
    for i in range(len(scores) - 1, -1, -1):
        j = int(picks[i, k])
        choice[i] = j
        k -= int(weights[i][j])
    return float(best[slots]), choice


def _solve_ilp(problem: _Problem, caps: dict[str, float]) -> list[int]:
    """Binary x[l, j], one per layer, every cap a linear row; HiGHS to optimality."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(b) for b in problem.bits]
    n = sum(sizes)
    if n == 0:
        return []
    c = np.concatenate(problem.scores)
    one_hot = np.zeros((len(sizes), n))
    offsets = np.cumsum([0] + sizes)
    for i in range(len(sizes)):
        one_hot[i, offsets[i] : offsets[i + 1]] = 1.0
    rows = [LinearConstraint(one_hot, 1.0, 1.0)]
    for resource, cap in caps.items():
        base = [c.min() for c in problem.costs[resource]]
        row = np.concatenate([c - b for c, b in zip(problem.costs[resource], base, strict=True)])
        room = cap * (1 + 1e-12) - problem.fixed[resource] - float(sum(base))
        scale = max(float(row.max()), 1e-300)  # unit-sized coefficients keep HiGHS' tolerances meaningful
        rows.append(LinearConstraint(row / scale, -np.inf, room / scale))
    res = milp(c, constraints=rows, integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise BitmixError(f"the ILP found no feasible assignment ({res.message}); raise the budget")
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(len(sizes))]


def _allocation(
    problem: _Problem, choice: Sequence[int], costs: CostTable, gap: float, solver: str, seconds: float
) -> Allocation:
    assignment = dict(problem.pinned)
    objective = 0.0
    for i, name in enumerate(problem.free):
        assignment[name] = problem.bits[i][choice[i]]
        objective += float(problem.scores[i][choice[i]])
    total = {r: sum(float(getattr(costs[n][b], r)) for n, b in assignment.items()) for r in RESOURCES}
    return Allocation(
        assignment={n: assignment[n] for n in problem.names},
        objective=objective,
        cost=LayerCost(total["cycles"], total["energy_j"], int(round(total["sram_bytes"]))),
        fraction=total["cycles"] / problem.reference,
        gap=gap,
        solver=solver,
        solve_s=seconds,
    )
