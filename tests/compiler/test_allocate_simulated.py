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


TINY_CHIP = ChipConfig(cores_x=2, cores_y=2, core_sram_bytes=128 * 1024)  # 512 KiB: a 512x512 MLP needs 2-4 chips


def _mlp_on_tiny_chip(seed):
    import itertools

    import torch
    from torch import nn

    from bitmix.compiler.capture import capture

    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.choice([128, 256, 384, 512, 640], size=7)]
    layers = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    mlp = nn.Sequential(*layers).eval()
    graph = capture(mlp, (torch.randn(int(rng.integers(1, 6)), widths[0]),))
    model = price(graph, NPU, TINY_CHIP)
    scores = _scores(graph.names, NPU, seed)
    every = [(list(c), model.evaluate(list(c))) for c in itertools.product(*[range(len(c)) for c in model.choices])]
    return graph, model, scores, every


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_multi_chip_budgets_are_answered_within_the_proven_gap_of_brute_force(seed):
    graph, model, scores, every = _mlp_on_tiny_chip(seed)
    top = simulate(graph, model.assignment(model.highest()), TINY_CHIP)
    assert not model.one_chip and top.chips > 1
    answered = 0
    for fraction in (cheapest_fraction(model), 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        fitting = [c for c, ev in every if ev.cycles * top.frames <= fraction * top.cycles * (1 + 1e-12)]
        if not fitting:
            with pytest.raises(BitmixError, match="ask for a budget of at least"):
                allocate(scores, model, NPU, graph.names, Budget(fraction=fraction))
            continue
        alloc = allocate(scores, model, NPU, graph.names, Budget(fraction=fraction))
        best = min(sum(scores[n][model.choices[i][j]] if len(model.choices[i]) > 1 else 0.0
                       for i, (n, j) in enumerate(zip(graph.names, c, strict=True))) for c in fitting)
        r = simulate(graph, alloc.assignment, TINY_CHIP)
        assert r.cycles <= fraction * top.cycles * (1 + 1e-12) and alloc.chips == r.chips
        assert alloc.objective - alloc.gap <= best + 1e-9 <= alloc.objective + 2e-9 + alloc.gap
        answered += 1
    assert answered >= 4


def test_a_pipelines_fps_goal_is_its_rate_not_its_latency():
    graph, model, scores, every = _mlp_on_tiny_chip(0)
    fastest = max(model.frames / ev.period_s for _, ev in every)
    slowest_latency = max(ev.cycles for _, ev in every) * model.frames / model.chip.clock_hz
    assert fastest > model.frames / slowest_latency  # pipelining beats 1 / latency
    goal = fastest * 0.999
    alloc = allocate(scores, model, NPU, graph.names, Budget(fps=goal))
    assert simulate(graph, alloc.assignment, TINY_CHIP).throughput_fps >= goal
    with pytest.raises(BitmixError, match=r"fps is out of reach .* runs [0-9.e+]+ fps"):
        allocate(scores, model, NPU, graph.names, Budget(fps=fastest * 1.5))


def test_compile_meets_the_default_budget_on_a_multi_chip_model(tmp_path):
    import torch
    from torch import nn

    import bitmix

    config = tmp_path / "chip.toml"
    config.write_text("[chip]\ncores_x = 2\ncores_y = 2\ncore_sram_bytes = 131072\n")
    torch.manual_seed(0)
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(8)]).eval()
    x = torch.randn(4, 512)
    target = bitmix.targets["int4int2-npu"].with_chip_config(str(config))
    cm = bitmix.compile(mlp, (x,), target, options=bitmix.CompileOptions(frontier_points=0))
    assert cm.report.simulated["chips"] > 1 and cm.report.info["achieved_fraction"] <= 0.75


def _wide_middle_layer():
    """An MLP whose middle layer (1024 -> 800) is 803 KiB at 8-bit weights, 402 KiB at 4: on `TINY_CHIP`
    (512 KiB) it fits one chip only at 4 bits and below."""
    import torch
    from torch import nn

    from bitmix.compiler.capture import capture

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 800), nn.ReLU(), nn.Linear(800, 10)).eval()
    x = torch.randn(16, 64)
    return mlp, x, capture(mlp, (x,))


@pytest.mark.parametrize("strategy", ["knapsack", "uniform", "random", "pareto-greedy"])
def test_a_layer_too_wide_for_a_chip_at_8_bits_is_allocated_among_the_choices_that_fit(strategy):
    mixed = get_target("mixed-npu")
    _, _, graph = _wide_middle_layer()
    model = price(graph, mixed, TINY_CHIP)
    middle = graph.names.index("2")
    assert [str(b) for b in model.unfit[middle]] == ["8/8"]
    assert model.choices[middle] == mixed.choices[1:] and all(not u for i, u in enumerate(model.unfit) if i != middle)
    top = simulate(graph, model.assignment(model.highest()), TINY_CHIP)  # the reference: 4/8 in the middle
    assert model.evaluate(model.highest()).cycles == pytest.approx(top.cycles / top.frames, rel=1e-9)
    for fraction in (1.0, 0.8, 0.6):
        if fraction < cheapest_fraction(model):
            continue
        alloc = allocate(_scores(graph.names, mixed), model, mixed, graph.names, Budget(fraction=fraction),
                         strategy=strategy)
        assert str(alloc.assignment["2"]) != "8/8"
        r = simulate(graph, alloc.assignment, TINY_CHIP)
        assert r.cycles / r.frames <= fraction * top.cycles / top.frames * (1 + 1e-9)


def test_a_layer_that_fits_a_chip_at_no_choice_is_refused_in_one_line():
    _, _, graph = _wide_middle_layer()
    with pytest.raises(BitmixError, match=r"^layer '2' fits one chip at none of its choices: at 8/8 it needs 803.1 KiB"
                                          r"[^\n]*raise chip.core_sram_bytes[^\n]*$"):
        price(graph, get_target("int8-npu"), TINY_CHIP)
    tiny = ChipConfig(cores_x=1, cores_y=1, core_sram_bytes=64 * 1024)
    with pytest.raises(BitmixError, match=r"even at its narrowest, 2/2, it needs"):
        price(graph, get_target("mixed-npu"), tiny)


def test_compile_warns_which_choices_a_layer_cannot_take(tmp_path):
    import bitmix

    config = tmp_path / "chip.toml"
    config.write_text("[chip]\ncores_x = 2\ncores_y = 2\ncore_sram_bytes = 131072\n")
    mlp, x, _ = _wide_middle_layer()
    target = bitmix.targets["mixed-npu"].with_chip_config(str(config))
    with pytest.warns(UserWarning, match=r"layer '2' does not fit one chip at 8/8 .* allocated among 4/8, 2/8"):
        cm = bitmix.compile(mlp, (x,), target, method="sqnr", data=x, budget=0.9,
                            options=bitmix.CompileOptions(frontier_points=3))
    assert str(cm.assignment["2"]) != "8/8"
    assert "8/8" not in [p["bits"] for p in cm.report.uniform]
    assert torch_equal_to_fake_quant(cm, x)


def torch_equal_to_fake_quant(cm, x) -> bool:
    import torch

    with torch.no_grad():
        return torch.equal(cm(x), cm.fake_quant(x))


def test_goals_missed_only_together_are_named_together():
    """Over several chips, fps with an energy cap was refused as "a throughput of 3.36e+06 fps is out of reach
    ...; the fastest pipeline found runs 3.54e+06 fps: ask for at most that" (less than was asked). That budget
    is met (3.76e6 fps at 1.2e-5 J, on 2 chips); 3.6e6 fps at 1e-5 J is met by no assignment tried, though each
    goal alone is."""
    import random

    import torch
    from torch import nn

    from bitmix.compiler.capture import capture
    from bitmix.simulator.config import config_from_dict

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())]).eval()
    graph = capture(model, (torch.randn(4, 1024),), "mlp")
    chip = config_from_dict({"chip": {"core_sram_bytes": 16384}})  # 4 MiB a chip: the weights take 2-3 chips
    target = get_target("mixed-npu")
    costs = price(graph, target, chip)
    rng = random.Random(1)
    scores = {n: {b: 0.0 if i == 0 else rng.random() * i for i, b in enumerate(c)}
              for n, c in zip(costs.names, costs.choices, strict=True)}
    met = allocate(scores, costs, target, graph.names, Budget(fps=3.36e6, energy_j=1.22e-5))
    r = simulate(graph, met.assignment, chip)
    assert r.throughput_fps >= 3.36e6 and r.energy_per_frame_j <= 1.22e-5
    for alone in (Budget(fps=3.6e6), Budget(energy_j=1e-5)):
        allocate(scores, costs, target, graph.names, alone)
    with pytest.raises(BitmixError, match=r"^the goals together \(energy_j 1e-05, fps 3.6e\+06\) are out of"):
        allocate(scores, costs, target, graph.names, Budget(fps=3.6e6, energy_j=1e-5))

