"""allocate: per-layer precisions within a budget of the simulator's exact whole-model cost.

The cost is a `CostModel` (unary + pairwise terms between consecutive layers) whose sum is
`simulate()` on one chip; `CostModel.evaluate` adds the multi-chip terms. One precision per
layer; minimise Σ score subject to the exact cost staying within the budget. One cap goes
to the chain DP (state = previous choice × budget slot, proven gap), several to the HiGHS
ILP (`bitmix.compiler.chain`). When an assignment spreads over several chips its PCIe and
idle-chip terms come on top of Σ terms, and a pipeline's fps is set by its slowest chip,
not by Σ cycles. Σ terms never exceeds the exact cost, so the solver's answer on Σ terms
bounds the optimum (and a budget Σ terms cannot meet is refused up front); when that answer
does not fit, the search goes split by split (which layers start a chip): over one split
the exact cost is a MILP (`bitmix.compiler.split`), solved for the relaxed answer's split,
one chip, the splits of exactly evaluated samples and their neighbours, within a time limit.

Baselines live here too: `uniform` (the best single precision that fits) and
`random_feasible` (random descents from all-highest until the budget is met).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bitmix.compiler.chain import Chain, min_cost, pareto_front, solve_dp, solve_ilp
from bitmix.compiler.pareto_greedy import pareto_greedy
from bitmix.compiler.split import neighbours, possible, solve_split, split_of
from bitmix.errors import BitmixError
from bitmix.ir.cost import RESOURCES, CostModel, Evaluation, LayerCost
from bitmix.ir.targets import Target

Scores = dict[str, dict[int, float]]
STRATEGIES = ("knapsack", "pareto-greedy", "pareto-greedy-normalised", "uniform", "random")
TOL = 1e-12  # relative slack on caps (floating-point summation order)
SAMPLES = 64  # random assignments of each kind that seed the multi-chip search
MAX_SPLITS = 128  # chip splits whose best assignment the multi-chip search solves, at most ...
# ... and at most this many pair-table entries summed over the splits solved: a cap on work, not on seconds, so the
# answer does not depend on the machine's speed or load (same seed, same result). One split of resnet50 at mixed-npu
# (1908 entries) solves in 0.15-1 s on a 2-vCPU AMD EPYC: about 33 splits, the ~10 s its old wall-clock cap allowed.
SPLIT_SEARCH_ENTRIES = 64_000
SPLIT_NODES = 1000  # HiGHS branch-and-bound nodes per split (its best answer within them is still checked)


@dataclass(frozen=True)
class Budget:
    """What the assignment may cost (per frame): a fraction of the all-highest cycles and/or absolute goals.

    `fraction` = 1.0 is the simulated cycles of every non-pinned layer at the target's
    highest choice (pinned layers at their pinned bits). `latency_s` is the latency of a
    run (all frames of the batch), `fps` frames per second (a multi-chip pipeline's rate,
    set by its slowest chip), `chips` the most chips allowed.
    """

    fraction: float | None = None
    cycles: float | None = None
    energy_j: float | None = None
    sram_bytes: float | None = None
    latency_s: float | None = None
    fps: float | None = None
    chips: int | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if not given:
            raise BitmixError("budget is empty; give a fraction (e.g. 0.75) or a cap on cycles, energy_j, sram_bytes, "
                              "latency_s, fps or chips")
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise BitmixError(f"budget {key}={value!r} must be a positive number")

    def caps(self, model: CostModel, reference: Evaluation) -> dict[str, float]:
        """Absolute caps per resource in the cost model's units (per frame), plus "chips"."""
        caps = {r: float(getattr(self, r)) for r in RESOURCES if getattr(self, r) is not None}
        cycles = self.cycle_goals(model, reference)
        if cycles:
            caps["cycles"] = min(cycles.values())
        if self.fps is not None and not model.one_chip:  # a pipeline: its period (the slowest chip) is not linear
            caps["period_s"] = model.frames / self.fps
        if self.chips is not None:
            caps["chips"] = float(self.chips)
        return caps

    def cycle_goals(self, model: CostModel, reference: Evaluation) -> dict[str, float]:
        """Each goal that caps the per-frame cycles, as that cap (one chip: a run's period is its latency)."""
        per_frame = model.chip.clock_hz / model.frames
        goals = {"cycles": self.cycles, "fraction": None if self.fraction is None else self.fraction * reference.cycles,
                 "latency_s": None if self.latency_s is None else self.latency_s * per_frame,
                 "fps": None if self.fps is None or not model.one_chip else model.chip.clock_hz / self.fps}
        return {k: float(v) for k, v in goals.items() if v is not None}


@dataclass(frozen=True)
class Allocation:
    """A chosen precision per layer (pinned ones included) and what it scores and costs, exactly."""

    assignment: dict[str, int] = field(hash=False)
    objective: float  # summed scores of the non-pinned layers
    cost: LayerCost  # the simulator's per-frame cycles, energy and resident weight bytes
    fraction: float  # cost.cycles / all-highest cycles (both simulated)
    gap: float  # proven bound on objective - optimum (0 = optimal)
    solver: str  # "dp", "ilp", "ilp + chip search" (multi-chip, see `_knapsack`), "uniform" or "random"
    chips: int = 1  # chips the assignment needs
    solve_s: float = field(default=0.0, compare=False)  # wall time, excluded from equality


@dataclass(frozen=True, eq=False)
class _Problem:
    model: CostModel
    free: tuple[bool, ...]
    scores: tuple[np.ndarray, ...]
    chains: dict[str, Chain]
    reference: Evaluation  # all-highest
    lowest: dict[str, tuple[float, list[int]]] = field(default_factory=dict)  # memo of `minimum`

    def minimum(self, resource: str) -> tuple[float, list[int]]:
        if resource not in self.lowest:
            self.lowest[resource] = minimum(self.model, resource)
        return self.lowest[resource]

    def bound(self, resource: str) -> float:
        """No assignment costs less: the cheapest Σ terms (the exact cost itself on one chip; chip splits
        only add to Σ terms: a chip's first layer fed from the frame buffer, PCIe and idle chips)."""
        return self.minimum(resource)[0] if self.model.one_chip else min_cost(self.chains[resource])[0]

    def objective(self, choice: Sequence[int]) -> float:
        return sum(float(s[j]) for s, j in zip(self.scores, choice, strict=True))


def allocate(
    scores: Scores,
    costs: CostModel,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    solver: str = "auto",
    strategy: str = "knapsack",
    seed: int = 0,
) -> Allocation:
    """The precision assignment that minimises Σ score within `budget` (or a baseline strategy).

    `solver` is "auto" (DP for one cap, ILP for several), "dp" or "ilp".
    `strategy` "uniform" / "random" dispatch to the baselines of the same names, "pareto-greedy"
    ("-normalised") to AIMET AMP's search (`bitmix.compiler.pareto_greedy`).
    """
    if strategy.startswith("pareto-greedy") and strategy in STRATEGIES:
        order = "cost-normalised" if strategy.endswith("normalised") else "sensitivity"
        return _pareto_greedy(_problem(scores, costs, target, layer_names), scores, target, budget, order)
    if strategy == "uniform":
        return uniform(costs, target, layer_names, budget, scores)
    if strategy == "random":
        return random_feasible(costs, target, layer_names, budget, seed, scores)
    if strategy != "knapsack":
        raise BitmixError(f"unknown allocation strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if solver not in ("auto", "dp", "ilp"):
        raise BitmixError(f"unknown solver {solver!r}; use auto, dp or ilp")
    return _knapsack(_problem(scores, costs, target, layer_names), budget, solver)


def _pareto_greedy(problem: _Problem, scores: Scores, target: Target, budget: Budget, order: str) -> Allocation:
    """AIMET AMP's search (`compiler/pareto_greedy.py`) on the exact costs: every probed point is simulated."""
    start = time.perf_counter()
    model = problem.model
    caps = budget.caps(model, problem.reference)
    _check_feasible(problem, caps, budget)
    assignment = pareto_greedy(scores, lambda a: model.evaluate(model.index(a)).cycles,
                               lambda a: _fits(model.evaluate(model.index(a)), caps), target, model.names, order,
                               dict(zip(model.names, model.choices, strict=True)))
    choice = model.index(assignment)
    label = "pareto-greedy" if order == "sensitivity" else f"pareto-greedy ({order})"
    return _allocation(problem, choice, model.evaluate(choice), math.inf, label, time.perf_counter() - start)


def _knapsack(problem: _Problem, budget: Budget, solver: str) -> Allocation:
    start = time.perf_counter()
    model = problem.model
    caps = budget.caps(model, problem.reference)
    _check_feasible(problem, caps, budget)
    linear = _linear_caps(problem, caps)
    one_chip_rows = _one_chip_rows(model) if caps.get("chips", math.inf) < 2 and not model.one_chip else []
    if solver == "dp" and (len(linear) != 1 or one_chip_rows):
        raise BitmixError("the DP solver handles one constraint; use solver='ilp' (or 'auto') for several caps")
    label = "ilp" if solver == "ilp" or len(linear) != 1 or one_chip_rows else "dp"

    def solve(tight: dict[str, float]) -> tuple[list[int], float] | None:
        rows = [(problem.chains[r], c) for r, c in tight.items()]
        if solver != "ilp" and len(rows) == 1 and not one_chip_rows:
            with contextlib.suppress(BitmixError):  # infeasible, or the scaled DP found nothing near the cap:
                return solve_dp(problem.scores, *rows[0])  # the ILP decides
        try:
            return solve_ilp(problem.scores, rows, one_chip_rows), 0.0
        except BitmixError:
            return None

    relaxed = solve(linear)
    if relaxed is None:
        raise BitmixError(_infeasible_message(problem, caps, budget, "infeasible together with the other limits"))
    choice, gap = relaxed
    lower = problem.objective(choice) - gap  # Σ terms <= the exact cost, so this bounds every fitting assignment
    ev = model.evaluate(choice)
    if _fits(ev, caps):
        return _allocation(problem, choice, ev, gap, label, time.perf_counter() - start)
    floor = _fitting_floor(problem, caps)
    found = [c for c in (floor,) if c is not None]
    tried = _split_search(problem, caps, choice)
    found += [c for c in tried if _fits(model.evaluate(c), caps)]
    if not found:
        raise BitmixError(_infeasible_message(problem, caps, budget, "out of reach of every assignment tried", tried))
    best = _improve(problem, min(found, key=problem.objective), caps)
    return _allocation(problem, best, model.evaluate(best), max(0.0, problem.objective(best) - lower),
                       "ilp + chip search", time.perf_counter() - start)


def _split_search(problem: _Problem, caps: dict[str, float], relaxed: list[int]) -> list[list[int]]:
    """The assignments tried over chip splits (not all fit): samples around the relaxed answer and at every
    level of precision, then the best assignment of one split after another (`solve_split`, exact): the relaxed
    answer's, one chip's, the samples' (nearest to fitting first) and those next to each split solved."""
    model = problem.model
    rng = np.random.default_rng(0)
    ks = np.array([len(c) for c in model.choices])
    tried = [relaxed, model.highest(), model.lowest(), *(problem.minimum(r)[1] for r in RESOURCES)]
    for t in range(SAMPLES):
        q = (t + 0.5) / SAMPLES
        tried.append([int(rng.integers(k)) if rng.random() < q else j for j, k in zip(relaxed, ks, strict=True)])
        tried.append(np.clip(np.rint(q * (ks - 1) + rng.normal(0, 0.5, len(ks))), 0, ks - 1).astype(int).tolist())
    rank: dict[tuple[int, ...], tuple[float, float]] = {}
    for c in tried:
        ev = model.evaluate(c)
        key = (max(1.0, *(ev.value(r) / cap for r, cap in caps.items())), problem.objective(c))
        split = split_of(model, c)
        rank[split] = min(rank.get(split, key), key)
    rank[split_of(model, relaxed)] = (0.0, 0.0)
    if possible(model, (0,)):
        rank[(0,)] = (0.0, 1.0)
    queue = [(key, k, split) for k, (split, key) in enumerate(sorted(rank.items(), key=lambda kv: kv[1]))
             if len(split) <= caps.get("chips", math.inf)]
    solved: set[tuple[int, ...]] = set()
    entries = sum(table.size for table in model.pair["cycles"])
    most = max(1, min(MAX_SPLITS, SPLIT_SEARCH_ENTRIES // max(1, entries)))
    while queue and len(solved) < most:
        key, _, split = heapq.heappop(queue)
        if split in solved:
            continue
        solved.add(split)
        answer = solve_split(model, problem.scores, split, caps, SPLIT_NODES)
        if answer is not None and _fits(model.evaluate(answer), caps):
            tried.append(answer)
            key = (1.0, problem.objective(answer))
        else:
            key = (key[0] * 1.001, key[1])  # after the splits as near to fitting
        for nb in neighbours(model, split, caps.get("chips", math.inf)):
            if nb not in solved:
                heapq.heappush(queue, (key, len(solved) + len(queue), nb))
    return tried


def _improve(problem: _Problem, choice: list[int], caps: dict[str, float]) -> list[int]:
    """Local search on the exact cost: take the best-scoring single-layer change that still fits, until none does."""
    choice = list(choice)
    while True:
        now = problem.objective(choice)
        moves = sorted((float(problem.scores[i][j] - problem.scores[i][c]), i, j) for i, c in enumerate(choice)
                       for j in range(len(problem.scores[i])) if problem.scores[i][j] < problem.scores[i][c])
        for _, i, j in moves:
            trial = [*choice[:i], j, *choice[i + 1:]]
            if problem.objective(trial) < now and _fits(problem.model.evaluate(trial), caps):
                choice = trial
                break
        else:
            return choice


def _linear_caps(problem: _Problem, caps: dict[str, float]) -> dict[str, float]:
    """What the solver constrains: the linear caps; a pipeline's period and a chip count through relaxations
    (Σ cycles up to its most costly value, Σ weight bytes within the chips' SRAM)."""
    linear = {r: c for r, c in caps.items() if r in RESOURCES}
    if "period_s" in caps and "cycles" not in linear:
        most = Chain.of([-u for u in problem.model.unary["cycles"]], [-p for p in problem.model.pair["cycles"]])
        linear["cycles"] = -min_cost(most)[0]
    if caps.get("chips", 0) >= 2 and not problem.model.one_chip:
        room = caps["chips"] * problem.model.chip.sram_bytes
        linear["sram_bytes"] = min(linear.get("sram_bytes", math.inf), room)
    return linear


def _fitting_floor(problem: _Problem, caps: dict[str, float]) -> list[int] | None:
    """The best-scoring of the known cheap assignments (each resource's minimum, all-lowest) that fits."""
    candidates = [problem.minimum(r)[1] for r in RESOURCES] + [problem.model.lowest()]
    fitting = [c for c in candidates if _fits(problem.model.evaluate(c), caps)]
    return min(fitting, key=problem.objective) if fitting else None


def frontier(
    scores: Scores,
    costs: CostModel,
    target: Target,
    layer_names: Sequence[str],
    fractions: Sequence[float] | None = None,
) -> list[Allocation]:
    """The Pareto set (simulated cycles vs summed score) over budget fractions, cheapest first.

    Fractions below the cheapest achievable assignment are skipped; by default 21
    fractions span the cheapest assignment to all-highest.
    """
    problem = _problem(scores, costs, target, layer_names)
    lowest = problem.minimum("cycles")[0] / problem.reference.cycles
    if fractions is None:
        fractions = list(np.linspace(lowest, 1.0, 21))
    feasible = [f for f in fractions if f >= lowest * (1 - TOL)]
    if not feasible:
        raise BitmixError(f"no fraction reaches the cheapest assignment; use fractions >= {lowest:.4f}")
    start = time.perf_counter()
    front = pareto_front(problem.scores, problem.chains["cycles"], max(feasible) * problem.reference.cycles
                         ) if problem.model.one_chip else None
    if front is None:  # chip splits (or a huge front): budget by budget
        found = [_knapsack(problem, Budget(fraction=max(f, lowest)), "auto") for f in sorted(feasible)]
    else:  # one exact Pareto pass answers every budget
        costs = [c for c, _, _ in front]
        found = []
        for f in sorted(feasible):
            k = bisect.bisect_right(costs, max(f, lowest) * problem.reference.cycles * (1 + TOL)) - 1
            choice = front[max(k, 0)][2]
            found.append(_allocation(problem, choice, problem.model.evaluate(choice), 0.0, "dp",
                                     time.perf_counter() - start))
    pareto: list[Allocation] = []
    for alloc in sorted(found, key=lambda a: (a.cost.cycles, a.objective)):
        if not pareto or alloc.objective < pareto[-1].objective - 1e-12:
            pareto.append(alloc)
    return pareto


def check_budget(costs: CostModel, target: Target, layer_names: Sequence[str], budget: Budget) -> None:
    """Refuse a budget no assignment meets, as `allocate` would, from the costs alone: the pipeline asks right
    after pricing, before scoring (ALPS/HAWQ train or probe every layer first: minutes on a real model)."""
    problem = _problem({}, costs, target, layer_names, require_scores=False)
    _check_feasible(problem, budget.caps(problem.model, problem.reference), budget)


def cheapest_fraction(costs: CostModel) -> float:
    """The cheapest assignment's simulated cycles over the all-highest cycles (the least feasible budget)."""
    return minimum(costs, "cycles")[0] / costs.evaluate(costs.highest()).cycles


def minimum(model: CostModel, resource: str) -> tuple[float, list[int]]:
    """The cheapest exact cost of `resource` and its choices: exact on one chip (min-plus DP over
    Σ terms); with chip splits, the better of that DP's answer and all-lowest, evaluated exactly."""
    chain = Chain.of(model.unary[resource], model.pair[resource])
    _, choice = min_cost(chain)
    if model.one_chip:
        return chain.cost(choice), choice
    candidates = [choice, model.lowest()]
    values = [model.evaluate(c).value(resource) for c in candidates]
    k = int(np.argmin(values))
    return values[k], candidates[k]


def uniform(
    costs: CostModel,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    scores: Scores | None = None,
) -> Allocation:
    """The highest single precision (for all non-pinned layers) that fits the budget."""
    problem = _problem(scores or {}, costs, target, layer_names, require_scores=False)
    caps = budget.caps(problem.model, problem.reference)
    _check_feasible(problem, caps, budget)
    for bits in target.choices:
        if any(free and bits not in opts for opts, free in zip(problem.model.choices, problem.free, strict=True)):
            continue  # some layer does not fit one chip at these bits
        choice = [opts.index(bits) if free else 0
                  for opts, free in zip(problem.model.choices, problem.free, strict=True)]
        ev = problem.model.evaluate(choice)
        if _fits(ev, caps):
            return _allocation(problem, choice, ev, 0.0, "uniform", 0.0)
    raise BitmixError(
        f"no single precision in {list(target.choices)} fits the budget; "
        "raise the budget or use a mixed-precision method (e.g. eagl)"
    )


def random_feasible(
    costs: CostModel,
    target: Target,
    layer_names: Sequence[str],
    budget: Budget,
    seed: int,
    scores: Scores | None = None,
) -> Allocation:
    """A random assignment that fills the budget: from all-highest, lower random layers until it fits.

    Each step lowers one uniformly chosen layer by one choice, so the result sits just
    under the budget like a knapsack solution does, without using any score. Lowering a
    layer can raise the coupled cost (e.g. a longer prefetch); if the walk reaches
    all-lowest without fitting, the cheapest assignment is returned.
    """
    problem = _problem(scores or {}, costs, target, layer_names, require_scores=False)
    model = problem.model
    caps = budget.caps(model, problem.reference)
    _check_feasible(problem, caps, budget)
    rng = random.Random(seed)
    choice = model.highest()
    ev = model.evaluate(choice)
    while not _fits(ev, caps):
        lowerable = [i for i, c in enumerate(choice) if c + 1 < len(model.choices[i])]
        if not lowerable:
            choice = _cheapest(problem, caps, budget)
            ev = model.evaluate(choice)
            break
        choice[rng.choice(lowerable)] += 1
        ev = model.evaluate(choice)
    return _allocation(problem, choice, ev, 0.0, "random", 0.0)


def _cheapest(problem: _Problem, caps: dict[str, float], budget: Budget) -> list[int]:
    choice = _fitting_floor(problem, caps)
    if choice is None:
        raise BitmixError(_infeasible_message(problem, caps, budget, "out of reach of every assignment tried"))
    return choice


def _problem(scores: Scores, costs: CostModel, target: Target, layer_names: Sequence[str],
             require_scores: bool = True) -> _Problem:
    names = tuple(layer_names)
    if not names:
        raise BitmixError("no layers to allocate")
    if not isinstance(costs, CostModel):
        raise BitmixError(f"costs must be a CostModel from bitmix.simulator.price, got {type(costs).__name__}")
    if costs.names != names:
        raise BitmixError("the cost model was priced for other layers than those given; re-run price() on this graph")
    pinned = target.pinned(names)
    free = tuple(n not in pinned for n in names)
    unfit = costs.unfit or ((),) * len(names)
    for name, opts, left_out in zip(names, costs.choices, unfit, strict=True):
        needed = (pinned[name],) if name in pinned else target.choices
        if tuple(b for b in needed if b in opts) != tuple(opts) or {*opts, *left_out} != set(needed):
            raise BitmixError(f"the cost model prices layer {name!r} at {list(opts)} bits but target "
                              f"{target.name!r} needs {list(needed)}; re-run price() for this target")
    if require_scores:
        for name, opts, f in zip(names, costs.choices, free, strict=True):
            missing = [b for b in opts if b not in scores.get(name, {})] if f else []
            if missing:
                raise BitmixError(f"scores have no {missing[0]}-bit value for layer {name!r}; re-run score()")
    score_arrays = tuple(np.array([float(scores.get(n, {}).get(b, 0.0)) if f else 0.0 for b in opts])
                         for n, f, opts in zip(names, free, costs.choices, strict=True))
    chains = {r: Chain.of(costs.unary[r], costs.pair[r]) for r in RESOURCES}
    reference = costs.evaluate(costs.highest())
    if reference.cycles <= 0:
        raise BitmixError("the all-highest assignment costs 0 cycles; the cost model is empty or broken")
    return _Problem(costs, free, score_arrays, chains, reference)


def _one_chip_rows(model: CostModel) -> list[tuple[list[np.ndarray], float]]:
    """Linear rows saying "fits one chip": Σ weight bytes + layer k's activations <= SRAM - programs, per k."""
    room = float(model.chip.sram_bytes - model.chip.program_bytes * len(model))
    weights = [w.astype(float) for w in model.weight_bytes]
    return [([w + (a.astype(float) if i == k else 0.0) for i, (w, a) in enumerate(zip(weights, model.act_bytes,
                                                                                         strict=True))], room)
            for k in range(len(model))]


def _fits(ev: Evaluation, caps: dict[str, float]) -> bool:
    return all(ev.value(r) <= cap * (1 + TOL) for r, cap in caps.items())


def _check_feasible(problem: _Problem, caps: dict[str, float], budget: Budget) -> None:
    """Raise with the cheapest achievable cost when a cap cannot be met (a pipeline's period is checked by search)."""
    for resource, cap in caps.items():
        if resource == "chips":
            least = problem.model.evaluate(problem.model.lowest()).chips
            if least > cap:
                raise BitmixError(f"budget of {cap:g} chips is infeasible; even the lowest precisions need {least} "
                                  f"chips: allow at least {least}")
        elif resource in RESOURCES and problem.bound(resource) > cap * (1 + TOL):
            raise BitmixError(_infeasible_message(problem, {resource: cap}, budget, "infeasible"))


def _infeasible_message(problem: _Problem, caps: dict[str, float], budget: Budget, why: str,
                        tried: Sequence[Sequence[int]] = ()) -> str:
    """One line in the units the user gave: a fraction, cycles, seconds, frames per second or joules."""
    model, ref = problem.model, problem.reference.cycles
    goals = ", ".join(f"{k} {v:.6g}" for k, v in vars(budget).items() if v is not None)
    found, least_found = ("", "minimum achievable") if model.one_chip else (" found", "least found")
    together = (f"the goals together ({goals}) are {why}, though the fastest assignment tried meets the speed goal "
                "alone; relax one of them")
    for resource, cap in caps.items():
        if resource == "period_s":
            fastest = min(model.evaluate(c).period_s for c in
                          (problem.minimum("cycles")[1], model.lowest(), model.highest(), *tried))
            if fastest <= cap * (1 + TOL) and len(caps) > 1:
                return together
            return (f"a throughput of {model.frames / cap:.6g} fps is {why}; the fastest pipeline found runs "
                    f"{model.frames / fastest:.6g} fps: ask for at most that")
        if resource not in RESOURCES:
            continue
        lowest = min([problem.minimum(resource)[0], *(model.evaluate(c).value(resource) for c in tried)])
        if resource == "cycles":
            goals = budget.cycle_goals(model, problem.reference)
            binding = min(goals, key=goals.__getitem__) if goals else "cycles"
            seconds = lowest * model.frames / model.chip.clock_hz
            if binding in ("fps", "latency_s") and lowest <= cap * (1 + TOL) and len(caps) > 1:
                return together
            if binding == "fps":
                return (f"a throughput of {budget.fps:.6g} fps is {why}; the fastest assignment{found} runs "
                        f"{model.frames / seconds:.6g} fps: ask for at most that")
            if binding == "latency_s":
                return (f"a latency of {budget.latency_s:.6g} s per run is {why}; the fastest assignment{found} takes "
                        f"{seconds:.6g} s: ask for at least that")
            least = math.ceil(lowest / ref * 1e4) / 1e4
            return (f"a budget of {cap:.6g} cycles ({cap / ref:.4f} of all-highest) is {why}; the {least_found} "
                    f"is {lowest:.6g} cycles ({lowest / ref:.4f}): ask for a budget of at least {least:.4f}")
        if resource == "energy_j" and (lowest > cap * (1 + TOL) or len(caps) == 1):
            return (f"an energy of {cap:.6g} J per frame is {why}; the most frugal assignment{found} takes "
                    f"{lowest:.6g} J per frame: ask for at least that")
        if lowest > cap * (1 + TOL) or len(caps) == 1:
            return (f"a budget of {cap:.6g} {resource} is {why}; the {least_found} is {lowest:.6g} {resource}: "
                    "relax that limit")
    return f"the budget is {why}; relax one of its limits ({', '.join(caps)})"


def _allocation(problem: _Problem, choice: Sequence[int], ev: Evaluation, gap: float, solver: str,
                seconds: float) -> Allocation:
    return Allocation(
        assignment=problem.model.assignment(choice),
        objective=problem.objective(choice),
        cost=LayerCost(ev.cycles, ev.energy_j, ev.sram_bytes),
        fraction=ev.cycles / problem.reference.cycles,
        gap=gap,
        solver=solver,
        chips=ev.chips,
        solve_s=seconds,
    )
