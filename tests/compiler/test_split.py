"""solve_split: over a fixed chip split, the MILP's cost is `CostModel.evaluate`'s, both ways."""

from __future__ import annotations

import numpy as np
import pytest

from bitmix.compiler.split import neighbours, possible, solve_split, split_of
from bitmix.ir.targets import get_target
from bitmix.simulator import ChipConfig, price

TINY_CHIP = ChipConfig(cores_x=2, cores_y=2, core_sram_bytes=128 * 1024)  # 512 KiB


def _model(target: str):
    import torch
    from torch import nn

    from bitmix.compiler.capture import capture

    torch.manual_seed(0)
    widths = [384, 512, 640, 512, 512, 384, 640, 256]
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:],
                                                                                        strict=True)]).eval()
    return price(capture(mlp, (torch.randn(3, widths[0]),), "mlp"), get_target(target), TINY_CHIP)


@pytest.mark.parametrize("target", ["int4int2-npu", "mixed-npu"])
def test_a_split_milp_costs_what_evaluate_says(target):
    """Scores that favour one assignment: with a cap at its exact cost the MILP returns it, with a cap just
    under it something else that is cheaper by `evaluate` and splits the same way (or nothing)."""
    model = _model(target)
    assert not model.one_chip
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(6):
        choice = [int(rng.integers(len(k))) for k in model.choices]
        ev, split = model.evaluate(choice), split_of(model, choice)
        assert possible(model, split)
        scores = [np.array([0.0 if j == c else 1.0 for j in range(len(k))]) for c, k in zip(choice, model.choices,
                                                                                         strict=True)]
        for resource in ("period_s", "cycles", "energy_j", "sram_bytes"):
            assert solve_split(model, scores, split, {resource: ev.value(resource) * (1 + 1e-9)}) == choice
            under = solve_split(model, scores, split, {resource: ev.value(resource) * (1 - 1e-4)})
            if under is not None:
                assert under != choice and split_of(model, under) == split
                assert model.evaluate(under).value(resource) <= ev.value(resource) * (1 - 1e-4) * (1 + 1e-9)
            checked += 1
        assert solve_split(model, scores, split, {"chips": len(split) - 1}) is None
    assert checked == 24


def test_neighbouring_splits_are_possible_ones_one_step_away():
    model = _model("int4int2-npu")
    split = split_of(model, model.highest())
    nearby = neighbours(model, split, np.inf)
    assert nearby and split not in nearby and all(possible(model, s) for s in nearby)
    assert all(s[0] == 0 and list(s) == sorted(set(s)) for s in nearby)
    assert not possible(model, (0,))  # all-lowest still takes two chips
