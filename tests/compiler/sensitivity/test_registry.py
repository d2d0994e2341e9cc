"""Registry, context helpers and the uniform/random baselines."""

from __future__ import annotations

import dataclasses

import pytest

from bitmix.compiler.sensitivity import METHODS, score, strategy
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target


def test_all_methods_registered_with_strategies():
    assert {"eagl", "alps", "hawq", "limpq", "sqnr", "uniform", "random"} <= set(METHODS)
    assert strategy("eagl") == "knapsack" and strategy("uniform") == "uniform" and strategy("random") == "random"


def test_unknown_method_lists_valid_ones(mlp_ctx):
    with pytest.raises(BitmixError, match="valid methods: .*eagl"):
        score("magic", mlp_ctx)
    with pytest.raises(BitmixError, match="valid methods"):
        strategy("magic")


@pytest.mark.parametrize("method", ["alps", "hawq", "limpq"])
def test_methods_needing_data_say_so(mlp_ctx, method):
    ctx = dataclasses.replace(mlp_ctx, data=None)
    with pytest.raises(BitmixError, match=f"'{method}' needs task data.*eagl.*sqnr"):
        score(method, ctx)


def test_sqnr_without_any_inputs_fails_clearly(mlp_ctx):
    with pytest.raises(BitmixError, match="'sqnr' needs unlabeled calibration"):
        score("sqnr", dataclasses.replace(mlp_ctx, data=None, calibration=None))


def test_baselines_score_zero_on_free_layers_only(mlp_ctx):
    ctx = dataclasses.replace(mlp_ctx, target=get_target("int4int2-npu"))
    assert ctx.free_layers == ("fc2",)
    assert score("uniform", ctx) == {"fc2": {4: 0.0, 2: 0.0}}
    assert score("random", ctx) == {"fc2": {4: 0.0, 2: 0.0}}
