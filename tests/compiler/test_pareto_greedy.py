"""Pareto-greedy (AIMET AMP's phase 2): one cumulative order, first fitting prefix, never beats the knapsack."""

from __future__ import annotations

import random

import pytest

from bitmix.compiler.allocate import Budget, allocate
from bitmix.compiler.pareto_greedy import Flip, flip_order, pareto_greedy, point, search
from bitmix.errors import BitmixError
from bitmix.ir.cost import CostModel
from bitmix.ir.targets import Target

TWO = Target("t42", (4, 2), pin_first_last=8)
THREE = Target("t842", (8, 4, 2))


def model(costs: dict[str, dict[int, float]]) -> CostModel:
    """An additive one-chip cost model: cycles as given, energy proportional."""
    names = tuple(costs)
    choices = [tuple(sorted(costs[n], reverse=True)) for n in names]
    cyc = [[costs[n][b] for b in c] for n, c in zip(names, choices, strict=True)]
    return CostModel.of_terms(names, choices, {"cycles": cyc, "energy_j": [[1e-9 * v for v in r] for r in cyc]})


NAMES = ("first", "a", "b", "c", "last")
COSTS = {"first": {8: 10.0}, "a": {4: 40.0, 2: 20.0}, "b": {4: 30.0, 2: 10.0}, "c": {4: 20.0, 2: 15.0},
         "last": {8: 10.0}}
SCORES = {"a": {4: 0.0, 2: 0.3}, "b": {4: 0.0, 2: 0.1}, "c": {4: 0.0, 2: 0.2}}


def cycles(assignment: dict[str, int]) -> float:
    return sum(COSTS[n][b] for n, b in assignment.items())


def greedy(scores, costs, target, names, fraction, order="sensitivity"):
    return allocate(scores, model(costs), target, names, Budget(fraction=fraction),
                    strategy="pareto-greedy" if order == "sensitivity" else "pareto-greedy-normalised")


def test_one_order_least_sensitive_first_cost_breaks_ties_only():
    flips = flip_order(SCORES, TWO, NAMES, cycles)
    assert [(f.layer, f.bits) for f in flips] == [("b", 2), ("c", 2), ("a", 2)]
    assert [f.saving for f in flips] == [20.0, 5.0, 20.0]
    tied = {n: {4: 0.0, 2: 0.5} for n in "abc"}  # equal sensitivity: larger saving first, then layer order
    assert [f.layer for f in flip_order(tied, TWO, NAMES, cycles)] == ["a", "b", "c"]
    normalised = flip_order(SCORES, TWO, NAMES, cycles, order="cost-normalised")
    assert [f.layer for f in normalised] == ["b", "a", "c"]  # 0.1/20 < 0.3/20 < 0.2/5


def test_milder_flip_first_on_ties_and_later_entries_win():
    scores = {"x": {8: 0.0, 4: 0.2, 2: 0.2}, "y": {8: 0.0, 4: 0.1, 2: 0.9}}
    costs = {"x": {8: 8.0, 4: 4.0, 2: 2.0}, "y": {8: 8.0, 4: 4.0, 2: 2.0}}
    names = ("x", "y")
    flips = flip_order(scores, THREE, names, lambda a: sum(costs[n][b] for n, b in a.items()))
    assert [(f.layer, f.bits) for f in flips] == [("y", 4), ("x", 4), ("x", 2), ("y", 2)]
    assert point(THREE, names, flips, 3) == {"x": 2, "y": 4}
    back = [Flip("x", 2, 0.0, 6.0), Flip("x", 4, 0.1, 4.0)]  # AMP applies entries in order: the later one wins
    assert point(THREE, names, back, 2) == {"x": 4, "y": 8}


@pytest.mark.parametrize("fraction", [0.6, 0.7, 0.78, 0.8, 0.85, 0.9, 1.0])
def test_returns_the_first_prefix_that_fits_without_filling_the_budget(fraction):
    flips = flip_order(SCORES, TWO, NAMES, cycles)
    reference = cycles(point(TWO, NAMES, flips, 0))
    first = next(i for i in range(len(flips) + 1) if cycles(point(TWO, NAMES, flips, i)) <= fraction * reference)
    alloc = greedy(SCORES, COSTS, TWO, NAMES, fraction)
    assert alloc.assignment == point(TWO, NAMES, flips, first)
    assert alloc.fraction <= fraction + 1e-12 and alloc.solver == "pareto-greedy"
    if first > 0:  # the point before it misses: nothing between points is returned
        assert cycles(point(TWO, NAMES, flips, first - 1)) > fraction * reference


def test_budget_between_points_is_not_interpolated():
    # the points cost 110, 90 (b), 85 (b, c), 65 (all three): a budget of 0.7 (77 cycles) falls between the
    # last two, so greedy takes the 65 point (score 0.6); lowering a and b (70 cycles, 0.4) is off its list
    alloc = greedy(SCORES, COSTS, TWO, NAMES, 0.7)
    assert alloc.assignment == {"first": 8, "a": 2, "b": 2, "c": 2, "last": 8}
    assert alloc.objective == pytest.approx(0.6) and alloc.cost.cycles == pytest.approx(65.0)
    exact = allocate(SCORES, model(COSTS), TWO, NAMES, Budget(fraction=0.7))
    assert exact.assignment == {"first": 8, "a": 2, "b": 2, "c": 4, "last": 8}
    assert exact.objective == pytest.approx(0.4)


def test_binary_search_probes_log_many_points():
    probes: list[int] = []

    def fits(i: int) -> bool:
        probes.append(i)
        return i >= 700

    assert search(1025, fits) == 700
    assert len(probes) <= 2 + 10
    assert search(5, lambda i: True) == 0
    with pytest.raises(ValueError):
        search(5, lambda i: False)


def test_infeasible_budgets_and_bad_orders_say_so():
    with pytest.raises(BitmixError, match="minimum achievable"):
        greedy(SCORES, COSTS, TWO, NAMES, 0.5)
    with pytest.raises(BitmixError, match="unknown pareto-greedy order"):
        flip_order(SCORES, TWO, NAMES, cycles, order="bogus")


def test_non_additive_cost_function_is_used_as_given():
    # a whole-assignment cost with an interaction: b and c together at 2 bits save less than apart
    def cost(a: dict[str, int]) -> float:
        return cycles(a) + (12.0 if a["b"] == 2 and a["c"] == 2 else 0.0)

    reference = cost(point(TWO, NAMES, [], 0))
    chosen = pareto_greedy(SCORES, cost, lambda a: cost(a) <= 0.8 * reference, TWO, NAMES)
    assert chosen == {"first": 8, "a": 2, "b": 2, "c": 2, "last": 8}


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_is_never_worse_than_greedy(seed):
    rng = random.Random(seed)
    target = THREE if seed % 2 else TWO
    names = tuple(f"l{i}" for i in range(rng.randint(3, 9)))
    pinned = target.pinned(names)
    cyc = {n: ({pinned[n]: rng.uniform(5, 50)} if n in pinned else
               dict(zip(target.choices, sorted((rng.uniform(1, 100) for _ in target.choices), reverse=True),
                        strict=True)))
           for n in names}
    costs = (cyc)
    scores = {n: dict(zip(target.choices, [0.0] + sorted(rng.expovariate(1) for _ in target.choices[1:]),
                          strict=True)) for n in names if n not in pinned}
    for fraction in (0.5, 0.65, 0.8, 0.9):
        for strategy in ("pareto-greedy", "pareto-greedy-normalised"):
            try:
                found = allocate(scores, model(costs), target, names, Budget(fraction=fraction), strategy=strategy)
            except BitmixError:
                continue
            exact = allocate(scores, model(costs), target, names, Budget(fraction=fraction))
            assert exact.objective <= found.objective + 1e-9
            assert found.fraction <= fraction * (1 + 1e-9)


def test_cost_normalised_order_never_takes_a_deeper_flip_back():
    """Per unit saved, x's 2-bit flip ranks before its milder 4-bit one; applied after it, the 4-bit entry would
    raise the cost again and the binary search would miss the fitting point between."""
    scores = {"x": {8: 0.0, 4: 0.5, 2: 0.6}, "y": {8: 0.0, 4: 0.05, 2: 5.0}}
    costs = {"x": {8: 80.0, 4: 40.0, 2: 5.0}, "y": {8: 20.0, 4: 19.0, 2: 18.0}}
    names = ("x", "y")

    def cost(a):
        return sum(costs[n][b] for n, b in a.items())

    flips = flip_order(scores, THREE, names, cost, order="cost-normalised")
    assert [(f.layer, f.bits) for f in flips] == [("x", 2), ("y", 4), ("y", 2)]  # x -> 4 bits would undo x -> 2
    along = [cost(point(THREE, names, flips, i)) for i in range(len(flips) + 1)]
    assert along == sorted(along, reverse=True)
    chosen = greedy(scores, costs, THREE, names, 0.3, order="cost-normalised")
    assert chosen.assignment == {"x": 2, "y": 8} and chosen.fraction <= 0.3
