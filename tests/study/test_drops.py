"""Additivity check: assignment sampling and the Spearman correlation it reports."""

from __future__ import annotations

import pytest
import torch

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.sensitivity import ScoreContext, score
from bitmix.errors import BitmixError
from bitmix.ir.targets import get_target
from bitmix.study.drops import check_additivity, random_assignments

torch.set_num_threads(1)
MIXED = get_target("mixed-npu")


def test_random_assignments_spread_the_number_of_lowered_layers():
    names = tuple(f"l{i}" for i in range(6))
    npu = get_target("int4int2-npu")
    out = random_assignments(names, npu, 12, seed=0)
    assert all(a["l0"] == 8 and a["l5"] == 8 for a in out)
    lowered = [sum(a[n] == 2 for n in names[1:-1]) for a in out]
    assert min(lowered) == 1 and max(lowered) == 4
    assert random_assignments(names, npu, 12, seed=0) == out
    fixed = random_assignments(names, npu, 5, seed=1, lowered=2)
    assert all(sum(a[n] == 2 for n in names) == 2 for a in fixed)
    with pytest.raises(BitmixError, match="two precision choices"):
        random_assignments(names, get_target("int8-npu"), 3, seed=0)


def test_sqnr_scores_predict_measured_drop_on_digits_mlp():
    model, example, data = zoo.load("digits-mlp")
    graph = capture(model, example, "digits-mlp")
    gm = prepare(graph)
    scores = score("sqnr", ScoreContext(graph, MIXED, gm, data))
    result = check_additivity(gm, graph.names, MIXED, scores, data, n=8, seed=0)
    assert len(result.predicted) == len(result.measured) == 8
    assert result.rho > 0.3  # noise powers roughly add: the ranking carries over


def test_a_constant_ranking_has_no_rho_and_no_warning():
    import math
    import warnings

    from bitmix.study.drops import correlate

    assignments = [{"a": 4}, {"a": 2}, {"a": 4}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = correlate({"a": {4: 0.0, 2: 0.0}}, assignments, [0.1, 0.2, 0.3])
    assert math.isnan(result.rho) and math.isnan(result.pvalue)


def _perfect_ranking(n: int) -> tuple[dict, list[dict], list[float]]:
    """n assignments whose summed scores rank the measured drops perfectly."""
    names = [f"l{i}" for i in range(n)]
    scores = {name: {2: float(i + 1)} for i, name in enumerate(names)}
    assignments = [{name: 2 for name in names[: k + 1]} for k in range(n)]
    return scores, assignments, [0.01 * (k + 1) ** 2 for k in range(n)]


def test_a_perfect_ranking_of_four_gets_the_exact_permutation_p():
    """The t-approximation gives p = 0 at |ρ| = 1; of the 4! pairings, 2 reach |ρ| = 1: p = 1/12."""
    from bitmix.study.drops import correlate

    result = correlate(*_perfect_ranking(4))
    assert result.rho == pytest.approx(1.0)
    assert result.pvalue == pytest.approx(1 / 12)


def test_sixteen_assignments_keep_the_asymptotic_p():
    from scipy.stats import spearmanr

    from bitmix.study.drops import correlate

    scores, assignments, measured = _perfect_ranking(16)
    measured[3], measured[9] = measured[9], measured[3]
    result = correlate(scores, assignments, measured)
    assert result.pvalue == spearmanr(result.predicted, measured)[1]


def test_additivity_measures_the_all_highest_reference_once_for_both_sets(tmp_path, monkeypatch):
    """Both sets' drops are taken against the same all-highest measure: measured once, the drops equal those of
    each set measured alone."""
    import json

    from bitmix.study import drops
    from bitmix.study.additivity import additivity
    from bitmix.study.config import default_config
    from bitmix.study.store import read_assignment

    config = default_config("digits-cnn-ptq", methods=("sqnr",), additivity=3)
    model, example, data = zoo.load("digits-cnn")
    graph = capture(model, example, "digits-cnn")
    prepared, target = prepare(graph), get_target(config.target)
    scores = score("sqnr", ScoreContext(graph, target, prepared, None, calibration=data.calibration(64)))
    highest = {n: target.highest for n in graph.names} | target.pinned(graph.names)
    calls = []
    quality = drops._quality
    monkeypatch.setattr(drops, "_quality", lambda m, a, *rest: calls.append(a == highest) or quality(m, a, *rest))
    additivity(config, tmp_path, "fp", prepared, graph.names, target, data, {("sqnr", 0): {"scores": scores}},
               lambda _: None)
    assert calls.count(True) == 1 and len(calls) == 1 + 2 * 3
    for entry in json.loads((tmp_path / "additivity.json").read_text())["sets"].values():
        alone = drops.measure_drops(prepared, graph.names, target, [read_assignment(a) for a in entry["assignments"]],
                                    data, seed=0, finetune_epochs=0, lr=1e-4, metric="loss")
        assert entry["measured"] == alone
