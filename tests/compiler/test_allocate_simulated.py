"""Budgets hold on the simulator's own numbers: chip splits, chip caps and absolute goals."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.compiler.allocate import Budget, allocate, cheapest_fraction, random_feasible
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target
from bitmix.simulator import ChipConfig, price, simulate

MIXED = get_target("mixed-npu")
NPU = get_target("int4int2-npu")
SMALL_CHIP = ChipConfig(core_sram_bytes=32 * 1024)  # 8 MiB: ResNet-18 needs 3 chips at 8 bits, 1 at 2 bits


def _scores(names, target, seed=0):
    rng = np.random.default_rng(seed)
    return {n: {b: float(v) for b, v in zip(target.choices, np.cumsum(rng.exponential(1, len(target.choices))) -
                                             1.0, strict=True)} for n in names}


def test_budget_holds_when_the_assignment_decides_the_chip_count(capture_zoo):
    graph = capture_zoo("resnet18")
    model = price(graph, MIXED, SMALL_CHIP)
    scores = _scores(graph.names, MIXED)
    top = simulate(graph, model.assignment(model.highest()), SMALL_CHIP)
    chips = set()
    for fraction in (cheapest_fraction(model), 0.6, 0.75, 0.9, 1.0):
        for alloc in (allocate(scores, model, MIXED, graph.names, Budget(fraction=fraction)),
                      random_feasible(model, MIXED, graph.names, Budget(fraction=fraction), seed=1)):
            r = simulate(graph, alloc.assignment, SMALL_CHIP)
            assert r.cycles <= fraction * top.cycles * (1 + 1e-12)
            assert alloc.fraction == pytest.approx(r.cycles / top.cycles, rel=1e-9, abs=0)
            assert alloc.chips == r.chips
            chips.add(r.chips)
    assert len(chips) > 1
    one = allocate(scores, model, MIXED, graph.names, Budget(fraction=1.0, chips=1))
    assert one.solver == "ilp" and simulate(graph, one.assignment, SMALL_CHIP).chips == 1
    assert one.objective > allocate(scores, model, MIXED, graph.names, Budget(fraction=1.0)).objective


def test_absolute_goals_hold_on_the_simulator(capture_zoo):
    graph = capture_zoo("digits-cnn")
    model = price(graph, NPU)
    scores = _scores([n for n, c in zip(model.names, model.choices, strict=True) if len(c) > 1], NPU)
    top = simulate(graph, model.assignment(model.highest()))
    low = simulate(graph, model.assignment(model.lowest()))
    latency = (top.latency_s + low.latency_s) / 2
    fps = 2 / (1 / top.throughput_fps + 1 / low.throughput_fps)
    energy = (top.energy_per_frame_j + low.energy_per_frame_j) / 2
    for budget in (Budget(latency_s=latency), Budget(fps=fps), Budget(energy_j=energy),
                   Budget(fps=fps, energy_j=energy)):
        for strategy in ("knapsack", "uniform", "random"):
            try:
                alloc = allocate(scores, model, NPU, graph.names, budget, strategy=strategy)
            except BitmixError as exc:  # uniform may have no single precision that fits
                assert strategy == "uniform" and "single precision" in str(exc)
                continue
            r = simulate(graph, alloc.assignment)
            if budget.latency_s:
                assert r.latency_s <= latency * (1 + 1e-12)
            if budget.fps:
                assert r.throughput_fps >= fps * (1 - 1e-12)
            if budget.energy_j:
                assert r.energy_per_frame_j <= energy * (1 + 1e-12)
