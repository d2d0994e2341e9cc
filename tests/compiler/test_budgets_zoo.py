"""Every zoo model, method and budget: the simulator's fraction is within budget and is what the report says."""

from __future__ import annotations

import pytest

import bitmix
from bitmix import zoo
from bitmix.compiler import sensitivity
from bitmix.compiler.allocate import Budget, allocate, cheapest_fraction
from bitmix.compiler.fold import prepare
from bitmix.ir.targets import Target, get_target
from bitmix.simulator import price, simulate

FAST = ("digits-cnn", "digits-mlp")
SLOW = tuple(n for n in zoo.names() if n not in FAST)
METHODS = ("eagl", "random", "uniform")
BUDGETS = (0.75, 0.8, 0.9)
TARGETS = (get_target("int4int2-npu"), Target("bits-8-4-2", (8, 4, 2)))  # 4/2 with pins; 8/4/2 b/b, none pinned


def _check_model(capture_zoo, name: str) -> None:
    graph = capture_zoo(name)
    prepared = prepare(graph)
    for target in TARGETS:
        model = price(graph, target)
        top = simulate(graph, model.assignment(model.highest())).cycles
        lowest = cheapest_fraction(model)
        all_lowest = model.evaluate(model.lowest()).cycles * model.frames / top  # uniform's cheapest point
        for method in METHODS:
            scores = sensitivity.score(method, sensitivity.ScoreContext(graph=graph, target=target, model=prepared))
            for budget in BUDGETS:
                clamped = max(budget, all_lowest if method == "uniform" else lowest)
                alloc = allocate(scores, model, target, graph.names, Budget(fraction=clamped),
                                 strategy=sensitivity.strategy(method), seed=1)
                simulated = simulate(graph, alloc.assignment).cycles / top
                case = (name, target.name, method, budget)
                assert simulated <= clamped * (1 + 1e-12), case
                assert alloc.fraction == pytest.approx(simulated, rel=1e-9, abs=0), case


@pytest.mark.parametrize("name", FAST)
def test_simulated_fraction_within_budget_and_reported(capture_zoo, name):
    _check_model(capture_zoo, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_simulated_fraction_within_budget_and_reported_large_models(capture_zoo, name):
    _check_model(capture_zoo, name)


def test_compile_reports_the_simulated_fraction(load_zoo, capture_zoo):
    """The issue-11 case: digits-cnn, eagl, budget 0.8 (the report said 0.7727, simulate() 0.8442)."""
    model, inputs, data = load_zoo("digits-cnn")
    cm = bitmix.compile(model, inputs, target="int4int2-npu", method="eagl", budget=0.8, calibration=data,
                        name="digits-cnn", frontier_points=3)
    graph = capture_zoo("digits-cnn")
    pinned = get_target("int4int2-npu").pinned(graph.names)
    top = simulate(graph, {n: pinned.get(n, 4) for n in graph.names}).cycles
    achieved = simulate(graph, cm.assignment).cycles / top
    assert achieved <= 0.8 * (1 + 1e-12)
    assert cm.report.info["achieved_fraction"] == pytest.approx(achieved, rel=1e-9, abs=0)
    assert cm.report.info["chips"] == cm.report.simulated["chips"] == 1
    for point in cm.report.frontier:
        assert simulate(graph, point["assignment"]).cycles / top <= point["fraction"] + 1e-4  # rounded to 4 places
