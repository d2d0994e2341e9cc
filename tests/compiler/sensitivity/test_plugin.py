"""Adding a method is one file: a toy method registers itself with its own config and compiles end to end."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import bitmix
from bitmix.compiler import sensitivity
from bitmix.compiler.sensitivity import METHODS, MethodConfig, ScoreContext, Scores, register
from bitmix.study import all_methods


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """Layers the toy method says are free to lower (negative drop at the lowest choice)."""

    lower: tuple[str, ...] = ()


@pytest.fixture
def toy():
    @register("toy", config=ToyConfig)
    def toy_scores(ctx: ScoreContext, cfg: ToyConfig) -> Scores:
        low = ctx.target.lowest
        return {n: {b: (-1.0 if n in cfg.lower else 1.0) * (b == low) for b in ctx.target.choices}
                for n in ctx.free_layers}

    yield toy_scores
    del METHODS["toy"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_registered_toy_method_compiles_with_its_config(toy):
    model, x = _mlp(), torch.randn(8, 16)
    names = bitmix.capture(model, x).names
    cm = bitmix.compile(model, x, "mixed-npu", method=ToyConfig(lower=(names[1],)), budget=1.0,
                        options=bitmix.CompileOptions(frontier_points=0))
    assert cm.assignment == {names[0]: 8, names[1]: 2, names[2]: 8}  # what the toy's config asked for
    assert cm.report.method == "toy"
    by_name = bitmix.compile(model, x, "mixed-npu", method="toy", budget=1.0,
                             options=bitmix.CompileOptions(frontier_points=0))
    assert set(by_name.assignment.values()) == {8}  # default config: nothing preferred low


def test_registry_feeds_the_backend_and_the_study(toy):
    assert "toy" in sensitivity.data_free()  # needs neither labels nor calibration: torch.compile may use it
    assert "toy" in all_methods()


def test_needs_data_is_enforced_and_listed(toy):
    @register("toy-data", config=MethodConfig, needs_data=True)
    def needs(ctx: ScoreContext, cfg: MethodConfig) -> Scores:
        raise AssertionError("never reached without data")

    try:
        assert "toy-data" not in sensitivity.data_free()
        with pytest.raises(bitmix.BitmixError, match="'toy-data' needs labelled training data"):
            bitmix.compile(_mlp(), torch.randn(8, 16), method="toy-data", budget=1.0,
                           options=bitmix.CompileOptions(frontier_points=0))
    finally:
        del METHODS["toy-data"]


def test_one_config_type_per_method(toy):
    with pytest.raises(bitmix.BitmixError, match="already registered for method 'toy'"):
        register("toy2", config=ToyConfig)
    with pytest.raises(bitmix.BitmixError, match="not the config of a registered method"):
        sensitivity.resolve(MethodConfig())
