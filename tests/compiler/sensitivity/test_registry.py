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
    with pytest.raises(BitmixError, match=f"'{method}' needs labelled training data.*eagl.*sqnr"):
        score(method, ctx)


def test_sqnr_without_any_inputs_fails_clearly(mlp_ctx):
    with pytest.raises(BitmixError, match="'sqnr' needs unlabeled calibration"):
        score("sqnr", dataclasses.replace(mlp_ctx, data=None, calibration=None))


def test_baselines_score_zero_on_free_layers_only(mlp_ctx):
    ctx = dataclasses.replace(mlp_ctx, target=get_target("int4int2-npu"))
    assert ctx.free_layers == ("fc2",)
    assert score("uniform", ctx) == {"fc2": {4: 0.0, 2: 0.0}}
    assert score("random", ctx) == {"fc2": {4: 0.0, 2: 0.0}}


@pytest.mark.parametrize("method", ["eagl", "alps", "hawq", "limpq", "sqnr"])
def test_a_single_choice_target_scores_zero_without_running_the_method(mlp_ctx, method, monkeypatch):
    ctx = dataclasses.replace(mlp_ctx, target=get_target("int4-npu"))
    monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], fn=lambda *_: pytest.fail("ran")))
    assert score(method, ctx) == dict.fromkeys(ctx.free_layers, {4: 0.0})
    ctx = dataclasses.replace(ctx, data=None, calibration=None)
    if method != "eagl":  # a missing input is still reported, before anything is skipped
        with pytest.raises(BitmixError, match="needs"):
            score(method, ctx)


def test_configs_resolve_by_name_or_instance():
    from bitmix.compiler.sensitivity import ALPSConfig, EAGLConfig, data_free, resolve

    method, config = resolve("alps")
    assert method.name == "alps" and config == ALPSConfig() and method.needs_data
    method, config = resolve(ALPSConfig(epochs=0.5))
    assert method.name == "alps" and config.epochs == 0.5
    assert resolve(EAGLConfig(variant="entropy_drop"))[0].name == "eagl"
    assert set(data_free()) == {"eagl", "uniform", "random"}  # sqnr needs calibration inputs, the rest labels
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 2  # type: ignore[misc]


def test_eagl_variant_comes_from_its_config(mlp_ctx):
    from bitmix.compiler.sensitivity import EAGLConfig, relative_to_highest
    from bitmix.compiler.sensitivity.eagl import eagl_scores

    drop = score(EAGLConfig(variant="entropy_drop"), mlp_ctx)
    assert drop == relative_to_highest(eagl_scores(mlp_ctx, EAGLConfig(variant="entropy_drop")), mlp_ctx.target)
    assert drop == score("eagl", mlp_ctx)  # entropy_drop is the default (chosen on digits-cnn/-mlp, docs/eagl.md)
    assert drop != score(EAGLConfig(variant="entropy"), mlp_ctx)
