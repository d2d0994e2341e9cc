"""Allocation on coupled costs: DP vs ILP vs brute force, hard budgets, errors, baselines, frontier."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bitmix.compiler.allocate import Budget, allocate, cheapest_fraction, frontier, minimum, random_feasible, uniform
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target

from .instances import brute_force, random_instance

MIXED = get_target("mixed-npu")
NPU = get_target("int4int2-npu")


def _dp_vs_ilp(instances: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    compared = 0
    for trial in range(instances):
        target = MIXED if trial % 2 else NPU
        names, model, scores = random_instance(rng, int(rng.integers(3, 40)), target)
        fraction = float(rng.uniform(cheapest_fraction(model), 1.0))
        dp = allocate(scores, model, target, names, Budget(fraction=fraction), solver="dp")
        ilp = allocate(scores, model, target, names, Budget(fraction=fraction), solver="ilp")
        assert dp.solver == "dp" and ilp.solver == "ilp"
        for a in (dp, ilp):  # hard budget on the exact (coupled) cost
            assert model.evaluate(model.index(a.assignment)).cycles <= fraction * model.evaluate(
                model.highest()).cycles * (1 + 1e-12)
        assert dp.gap == 0.0, f"trial {trial}"
        assert dp.objective == pytest.approx(ilp.objective, abs=1e-7), f"trial {trial}"
        compared += 1
    assert compared == instances


def test_dp_and_ilp_agree_on_random_coupled_instances():
    _dp_vs_ilp(30, seed=10)


@pytest.mark.slow
def test_dp_and_ilp_agree_on_200_random_coupled_instances():
    _dp_vs_ilp(200, seed=0)


@pytest.mark.parametrize("target,layers", [(MIXED, 7), (NPU, 12)])
def test_dp_and_ilp_match_brute_force(target, layers):
    rng = np.random.default_rng(1)
    for _ in range(6):
        names, model, scores = random_instance(rng, layers, target)
        fraction = float(rng.uniform(cheapest_fraction(model), 1.0))
        cap = fraction * model.evaluate(model.highest()).cycles
        expected, _ = brute_force(model, scores, {"cycles": cap})
        for solver in ("dp", "ilp"):
            got = allocate(scores, model, target, names, Budget(fraction=fraction), solver=solver)
            assert got.objective == pytest.approx(expected, abs=1e-9) and got.gap == 0.0


def test_minimum_is_the_true_minimum_not_all_lowest():
    rng = np.random.default_rng(2)
    found_coupled = False
    for _ in range(20):
        names, model, scores = random_instance(rng, 6, MIXED)
        best = min(model.evaluate(c).cycles for c in _all(model))
        assert minimum(model, "cycles")[0] == pytest.approx(best, rel=1e-12)
        found_coupled |= model.evaluate(model.lowest()).cycles > best * (1 + 1e-9)
    assert found_coupled  # the instances do have cheaper-than-all-lowest mixes


def test_budget_below_the_true_minimum_names_it():
    rng = np.random.default_rng(3)
    names, model, scores = random_instance(rng, 6, MIXED)
    least = cheapest_fraction(model)
    with pytest.raises(BitmixError, match=r"minimum achievable is .* cycles \(0\.\d+\)") as err:
        allocate(scores, model, MIXED, names, Budget(fraction=least * 0.99))
    assert "\n" not in str(err.value)
    shown = float(re.search(r"at least (\d\.\d+)", str(err.value)).group(1))
    assert shown >= least and shown - least < 1e-4
    assert allocate(scores, model, MIXED, names, Budget(fraction=least)).fraction <= least * (1 + 1e-12)


def test_pinned_layers_keep_their_bits_and_count_in_cost():
    rng = np.random.default_rng(4)
    names, model, scores = random_instance(rng, 6, NPU)
    alloc = allocate(scores, model, NPU, names, Budget(fraction=0.8))
    assert alloc.assignment["l0"] == 8 and alloc.assignment["l5"] == 8 and list(alloc.assignment) == list(names)
    assert alloc.cost.cycles == pytest.approx(model.evaluate(model.index(alloc.assignment)).cycles, rel=1e-12)
    full = allocate(scores, model, NPU, names, Budget(fraction=1.0))
    assert all(b == 4 for n, b in full.assignment.items() if n not in ("l0", "l5"))
    assert full.objective == 0.0 and full.fraction == pytest.approx(1.0)


def test_multiple_caps_use_the_ilp_and_respect_every_cap():
    rng = np.random.default_rng(5)
    names, model, scores = random_instance(rng, 7, MIXED)
    top = model.evaluate(model.highest())
    budget = Budget(fraction=0.85, energy_j=top.energy_j * 0.7, sram_bytes=top.sram_bytes * 0.7)
    alloc = allocate(scores, model, MIXED, names, budget)
    assert alloc.solver == "ilp"
    ev = model.evaluate(model.index(alloc.assignment))
    assert ev.cycles <= 0.85 * top.cycles * (1 + 1e-12)
    assert ev.energy_j <= top.energy_j * 0.7 * (1 + 1e-12) and ev.sram_bytes <= top.sram_bytes * 0.7
    assert alloc.objective == pytest.approx(brute_force(model, scores, budget.caps(model, top))[0], abs=1e-9)
    with pytest.raises(BitmixError, match="one constraint"):
        allocate(scores, model, MIXED, names, budget, solver="dp")


def test_bad_budgets_and_inputs_say_what_to_do():
    rng = np.random.default_rng(6)
    names, model, scores = random_instance(rng, 5, NPU)
    for bad in ({"fraction": 0.0}, {"cycles": -3}, {"fps": float("nan")}, {"chips": True}):
        with pytest.raises(BitmixError, match="positive"):
            Budget(**bad)
    with pytest.raises(BitmixError, match="empty"):
        Budget()
    with pytest.raises(BitmixError, match="no 4/4-bit value"):
        allocate({}, model, NPU, names, Budget(fraction=0.9))
    with pytest.raises(BitmixError, match="re-run price"):
        allocate(scores, model, MIXED, names, Budget(fraction=0.9))
    with pytest.raises(BitmixError, match="strategy"):
        allocate(scores, model, NPU, names, Budget(fraction=0.9), strategy="greedy")


def test_frontier_is_exact_pareto_and_monotone():
    rng = np.random.default_rng(7)
    names, model, scores = random_instance(rng, 15, MIXED)
    fractions = list(np.linspace(cheapest_fraction(model), 1.0, 12))
    front = frontier(scores, model, MIXED, names, fractions)
    assert len(front) >= 3
    cycles = [a.cost.cycles for a in front]
    objectives = [a.objective for a in front]
    assert cycles == sorted(cycles) and all(b < a for a, b in zip(objectives, objectives[1:], strict=False))
    assert front[-1].objective == pytest.approx(0.0)
    singles = {round(allocate(scores, model, MIXED, names, Budget(fraction=f)).objective, 9) for f in fractions}
    assert {round(a.objective, 9) for a in front} <= singles


def test_uniform_and_random_baselines_fit_the_exact_budget():
    rng = np.random.default_rng(8)
    names, model, scores = random_instance(rng, 10, MIXED)
    top = model.evaluate(model.highest()).cycles
    budget = Budget(fraction=0.8)
    uni = uniform(model, MIXED, names, budget, scores)
    assert len(set(uni.assignment.values())) == 1
    assert model.evaluate(model.index(uni.assignment)).cycles <= 0.8 * top * (1 + 1e-12)
    assert allocate(scores, model, MIXED, names, budget, strategy="uniform") == uni
    draws = [random_feasible(model, MIXED, names, budget, seed) for seed in range(8)]
    assert all(model.evaluate(model.index(d.assignment)).cycles <= 0.8 * top * (1 + 1e-12) for d in draws)
    assert all(d.fraction == pytest.approx(model.evaluate(model.index(d.assignment)).cycles / top, rel=1e-12)
               for d in draws)
    assert len({tuple(d.assignment.values()) for d in draws}) > 1
    assert random_feasible(model, MIXED, names, budget, 3) == draws[3]
    best = allocate(scores, model, MIXED, names, budget)
    assert best.objective <= min(random_feasible(model, MIXED, names, budget, s, scores).objective for s in range(5))


def _all(model):
    import itertools

    return itertools.product(*(range(len(c)) for c in model.choices))
