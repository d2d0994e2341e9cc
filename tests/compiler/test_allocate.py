"""Knapsack allocation: DP vs ILP vs brute force, budgets, errors, baselines, frontier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitmix.compiler.allocate import Budget, allocate, frontier, random_feasible, uniform
from bitmix.errors import BitmixError
from bitmix.ir.cost import LayerCost
from bitmix.ir.targets import Target, get_target

MIXED = get_target("mixed-npu")
NPU = get_target("int4int2-npu")


def _instance(rng: np.random.Generator, n_layers: int, target: Target):
    """Random costs that shrink with bits and scores that grow as bits drop."""
    names = tuple(f"l{i}" for i in range(n_layers))
    pinned = target.pinned(names)
    costs, scores = {}, {}
    for name in names:
        base = rng.uniform(1e3, 1e5)
        costs[name] = {
            b: LayerCost(base * (b / 8) ** rng.uniform(0.3, 1.0), base * b * 1e-12 * rng.uniform(0.5, 2), int(base * b))
            for b in target.all_bits
        }
        if name not in pinned:
            drops = np.cumsum(rng.exponential(1.0, len(target.choices)))
            scores[name] = {b: float(d - drops[0]) for b, d in zip(target.choices, drops, strict=True)}
    return names, costs, scores


def _brute_force(names, costs, scores, target, cap):
    pinned = target.pinned(names)
    free = [n for n in names if n not in pinned]
    fixed = sum(costs[n][b].cycles for n, b in pinned.items())
    best = np.inf
    for combo in itertools.product(target.choices, repeat=len(free)):
        if fixed + sum(costs[n][b].cycles for n, b in zip(free, combo, strict=True)) <= cap * (1 + 1e-12):
            best = min(best, sum(scores[n][b] for n, b in zip(free, combo, strict=True)))
    return best


def test_dp_and_ilp_agree_on_200_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(200):
        target = MIXED if trial % 2 else NPU
        names, costs, scores = _instance(rng, int(rng.integers(3, 40)), target)
        fraction = float(rng.uniform(0.45, 1.0))
        try:
            dp = allocate(scores, costs, target, names, Budget(fraction=fraction), solver="dp")
        except BitmixError:
            continue
        ilp = allocate(scores, costs, target, names, Budget(fraction=fraction), solver="ilp")
        assert dp.solver == "dp" and ilp.solver == "ilp"
        assert dp.fraction <= fraction * (1 + 1e-9) and ilp.fraction <= fraction * (1 + 1e-6)
        assert dp.objective - dp.gap <= ilp.objective + 1e-7
        assert dp.objective == pytest.approx(ilp.objective, abs=1e-7), f"trial {trial}: gap {dp.gap}"


def test_dp_matches_brute_force_on_small_instances():
    rng = np.random.default_rng(1)
    for _ in range(30):
        names, costs, scores = _instance(rng, 7, MIXED)
        fraction = float(rng.uniform(0.5, 1.0))
        cap = fraction * sum(costs[n][8].cycles for n in names)
        expected = _brute_force(names, costs, scores, MIXED, cap)
        if not np.isfinite(expected):
            continue
        dp = allocate(scores, costs, MIXED, names, Budget(fraction=fraction))
        assert dp.objective == pytest.approx(expected, abs=1e-9) and dp.gap == 0.0


def test_pinned_layers_keep_their_bits_and_count_in_cost():
    rng = np.random.default_rng(2)
    names, costs, scores = _instance(rng, 6, NPU)
    alloc = allocate(scores, costs, NPU, names, Budget(fraction=0.8))
    assert alloc.assignment["l0"] == 8 and alloc.assignment["l5"] == 8
    assert list(alloc.assignment) == list(names)
    assert alloc.cost.cycles == pytest.approx(sum(costs[n][b].cycles for n, b in alloc.assignment.items()))
    full = allocate(scores, costs, NPU, names, Budget(fraction=1.0))
    assert all(b == 4 for n, b in full.assignment.items() if n not in ("l0", "l5"))
    assert full.objective == 0.0 and full.fraction == pytest.approx(1.0)


def test_multiple_caps_use_the_ilp_and_respect_every_cap():
    rng = np.random.default_rng(3)
    names, costs, scores = _instance(rng, 12, MIXED)
    top = allocate(scores, costs, MIXED, names, Budget(fraction=1.0))
    budget = Budget(fraction=0.8, energy_j=top.cost.energy_j * 0.6, sram_bytes=top.cost.sram_bytes * 0.7)
    alloc = allocate(scores, costs, MIXED, names, budget)
    assert alloc.solver == "ilp"
    assert alloc.fraction <= 0.8 + 1e-6
    assert alloc.cost.energy_j <= top.cost.energy_j * 0.6 * (1 + 1e-6)
    assert alloc.cost.sram_bytes <= top.cost.sram_bytes * 0.7 * (1 + 1e-6)
    with pytest.raises(BitmixError, match="one constraint"):
        allocate(scores, costs, MIXED, names, budget, solver="dp")


def test_infeasible_and_bad_budgets_say_what_to_do():
    rng = np.random.default_rng(4)
    names, costs, scores = _instance(rng, 5, NPU)
    with pytest.raises(BitmixError, match=r"minimum achievable is .* cycles \(0\.\d+\)"):
        allocate(scores, costs, NPU, names, Budget(fraction=0.05))
    with pytest.raises(BitmixError, match="positive"):
        Budget(fraction=0.0)
    with pytest.raises(BitmixError, match="positive"):
        Budget(cycles=-3)
    with pytest.raises(BitmixError, match="empty"):
        Budget()
    with pytest.raises(BitmixError, match="no 4-bit value"):
        allocate({}, costs, NPU, names, Budget(fraction=0.9))


def test_frontier_is_pareto_and_monotone():
    rng = np.random.default_rng(5)
    names, costs, scores = _instance(rng, 15, MIXED)
    front = frontier(scores, costs, MIXED, names)
    assert len(front) >= 3
    cycles = [a.cost.cycles for a in front]
    objectives = [a.objective for a in front]
    assert cycles == sorted(cycles)
    assert all(b < a for a, b in zip(objectives, objectives[1:], strict=False))
    assert front[-1].objective == pytest.approx(0.0)


def test_uniform_and_random_baselines_fit_the_budget():
    rng = np.random.default_rng(6)
    names, costs, scores = _instance(rng, 10, MIXED)
    budget = Budget(fraction=0.7)
    uni = uniform(costs, MIXED, names, budget, scores)
    assert len(set(uni.assignment.values())) == 1 and uni.fraction <= 0.7
    assert allocate(scores, costs, MIXED, names, budget, strategy="uniform") == uni
    draws = [random_feasible(costs, MIXED, names, budget, seed) for seed in range(5)]
    assert all(d.fraction <= 0.7 for d in draws)
    assert len({tuple(d.assignment.values()) for d in draws}) > 1
    assert random_feasible(costs, MIXED, names, budget, 3) == draws[3]
    best = allocate(scores, costs, MIXED, names, budget)
    assert best.objective <= min(random_feasible(costs, MIXED, names, budget, s, scores).objective for s in range(5))
    with pytest.raises(BitmixError, match="strategy"):
        allocate(scores, costs, MIXED, names, budget, strategy="greedy")
