"""`bitmix study frontier --quick`: outputs, JSON structure, infeasible budgets and resuming."""

from __future__ import annotations

import json

import pytest

from bitmix.cli import main


def test_quick_frontier_writes_outputs_and_resumes(tmp_path):
    out, page = tmp_path / "study", tmp_path / "docs" / "results.md"
    args = ["study", "frontier", "digits-mlp", "--quick", "--workers", "1", "--out", str(out), "--results", str(page)]
    assert main(args) == 0
    d = out / "digits-mlp"
    for name in ("frontier.json", "frontier.png", "search_time.json", "additivity.png", "README.md", "points.jsonl"):
        assert (d / name).stat().st_size > 0, name
    result = json.loads((d / "frontier.json").read_text())
    assert result["model"] == "digits-mlp" and result["metric"] == "top1"
    assert set(result["frontier"]) == {"eagl", "uniform"}
    assert result["config"]["seeds"] == 1 and result["config"]["budgets"] == [0.8, 1.0]
    # digits-mlp's cheapest int4int2 assignment costs ~0.92 of all-4: 0.8 is reported infeasible, not faked
    for method in ("eagl", "uniform"):
        rows = {r["budget"]: r for r in result["frontier"][method]}
        assert rows[0.8]["status"] == "infeasible" and 0.8 < rows[0.8]["min_fraction"] <= 1.0
        assert rows[1.0]["status"] == "ok" and 0 <= rows[1.0]["quality_mean"] <= 100
        assert rows[1.0]["fps_mean"] > 0 and rows[1.0]["energy_per_frame_j_mean"] > 0
    refs = result["references"]
    assert set(refs) == {"all-8", "all-4", "all-2"}
    assert refs["all-8"]["fps_mean"] < refs["all-4"]["fps_mean"] < refs["all-2"]["fps_mean"]
    point = next(p for p in result["points"] if p["status"] == "ok" and p["method"] == "eagl")
    assert point["quality"] == point["quality_fake_quant"]  # kernels are bit-exact with fake-quant inference
    assert {"eagl", "uniform"} <= set(json.loads((d / "search_time.json").read_text())["methods"])
    assert result["dominance"][0]["best_other"] == "uniform"
    sets = result["additivity"]["sets"]
    assert set(sets) == {"spread", "fixed"}
    assert {len(set(sets["fixed"]["lowered_layers"]))} == {1}  # fixed-size subsets: only the choice varies
    for entry in sets.values():
        assert "rho" in entry["methods"]["eagl"] and len(entry["measured"]) == result["additivity"]["n"]
    # every knapsack method is also allocated by the Pareto-greedy search; the page reports knapsack − greedy
    assert [(r["method"], r["budget"]) for r in result["knapsack_vs_greedy"]] == [("eagl", 1.0)]
    text = page.read_text()
    assert "(a)" in text and "(d)" in text and "digits-mlp" in text
    assert "Knapsack vs Pareto-greedy" in text and "| eagl | 1 |" in text and "**(e) Exactness" in text
    assert (page.parent / "digits-mlp-frontier.png").exists()
    # resume: every point is cached, nothing is fine-tuned again, the numbers are unchanged
    lines = (d / "points.jsonl").read_text().count("\n")
    assert main(args) == 0
    assert (d / "points.jsonl").read_text().count("\n") == lines
    again = json.loads((d / "frontier.json").read_text())
    assert again["frontier"] == result["frontier"] and again["references"] == result["references"]


def test_ptq_variant_is_the_same_sweep_without_fine_tuning():
    from bitmix.study import default_config

    base, ptq = default_config("digits-cnn"), default_config("digits-cnn-ptq")
    assert ptq.model == "digits-cnn" and ptq.label == "digits-cnn-ptq" and base.label == "digits-cnn"
    assert ptq.recipe.epochs == 0 and base.recipe.epochs > 0 and ptq.additivity_epochs == 0
    assert (ptq.methods, ptq.budgets, ptq.seeds) == (base.methods, base.budgets, base.seeds)
    assert ptq.fingerprint() != base.fingerprint()
    # scoring does not depend on the recipe after allocation: both studies score alike
    assert ptq.fingerprint(scores_only=True) == base.fingerprint(scores_only=True)


def test_method_seeds_cut_one_method_only():
    from bitmix.errors import BitmixError
    from bitmix.study import default_config

    config = default_config("digits-cnn", method_seeds={"alps": 2})
    assert (config.seeds_of("alps"), config.seeds_of("eagl"), config.seeds) == (2, 5, 5)
    assert config.fingerprint() == default_config("digits-cnn").fingerprint()  # no measured number changes
    with pytest.raises(BitmixError, match="method-seeds"):
        default_config("digits-cnn", method_seeds={"nope": 2})


def test_seeds_are_checked_even_when_quick_replaces_them():
    from bitmix.errors import BitmixError
    from bitmix.study import default_config

    assert default_config("digits-cnn", seeds=3, quick=True).seeds == 1
    for quick in (False, True):
        with pytest.raises(BitmixError, match="--seeds must be >= 1, got 0"):
            default_config("digits-cnn", seeds=0, quick=quick)


def test_study_methods_and_options_come_from_the_registry():
    from bitmix.compiler.sensitivity import ALPSConfig, HAWQConfig
    from bitmix.study import all_methods, default_config

    config = default_config("minilm")
    assert set(config.methods) == set(all_methods()) - {"limpq"} and {"eagl", "alps", "uniform"} <= set(config.methods)
    assert config.method("alps") == ALPSConfig(epochs=0.1, calibration_size=32, batch_size=16)
    assert config.method("hawq") == HAWQConfig(samples=8, examples=64)
    assert config.method("eagl") == "eagl"  # no study options: the registered defaults


def test_w4a8_studies_name_their_target_and_feasible_budgets():
    from bitmix.ir.precision import Precision
    from bitmix.ir.targets import get_target
    from bitmix.study import default_config
    from bitmix.study.config import references

    ptq = default_config("minilm-ptq-w4a8")
    assert (ptq.model, ptq.label, ptq.target, ptq.recipe.epochs) == ("minilm", "minilm-ptq-w4a8", "w4a8-npu", 0)
    assert ptq.data_limits is not None and min(ptq.budgets) > 0.99 and max(ptq.budgets) == 1.0
    cnn = default_config("digits-cnn-w4a8")
    assert cnn.target == "w4a8-npu" and cnn.recipe.epochs > 0 and cnn.data_limits is None
    assert cnn.fingerprint() != default_config("digits-cnn").fingerprint()
    assert default_config("digits-cnn").target == "int4int2-npu"
    assert references(get_target("w4a8-npu")) == (("all-8", Precision(8, 8)), ("all-4/8", Precision(4, 8)),
                                                  ("all-2/8", Precision(2, 8)))
    assert [label for label, _ in references(get_target("int4int2-npu"))] == ["all-8", "all-4", "all-2"]
    rotated = default_config("minilm-ptq-w4a8r")
    assert (rotated.model, rotated.target, rotated.recipe.epochs) == ("minilm", "w4a8r-npu", 0)
    assert min(rotated.budgets) == 0.85 and rotated.fingerprint() != ptq.fingerprint()
    assert [label for label, _ in references(get_target("w4a8r-npu"))] == ["all-8", "all-4/8r", "all-2/8r"]


def test_limit_data_keeps_evenly_spaced_examples():
    import torch

    from bitmix.study.sweep import limit_data
    from bitmix.task import Split, TaskData

    split = Split((torch.arange(10.0)[:, None],), torch.arange(10))
    data = TaskData("t", "top1", split, split)
    small = limit_data(data, (5, 3))
    assert small.train.targets.tolist() == [0, 2, 4, 7, 9] and small.test.targets.tolist() == [0, 4, 9]
    assert limit_data(data, None) is data and limit_data(data, (20, 20)).train is data.train


@pytest.mark.slow
def test_ptq_study_measures_an_assignment_once_for_every_seed(tmp_path):
    out = tmp_path / "study"
    args = ["study", "frontier", "digits-cnn-ptq-w4a8", "--methods", "uniform", "--seeds", "2", "--budgets", "1.0",
            "--workers", "1", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "digits-cnn-ptq-w4a8" / "frontier.json").read_text())
    assert result["target"] == "w4a8-npu" and set(result["references"]) == {"all-8", "all-4/8", "all-2/8"}
    ok = [p for p in result["points"] if p["status"] == "ok"]
    by_seed = {(p["method"], p["seed"]): p for p in ok}
    for label in ("uniform", "all-8", "all-4/8", "all-2/8"):  # no fine-tuning: one measurement serves both seeds
        assert by_seed[(label, 1)]["measure_s"] == by_seed[(label, 0)]["measure_s"]
        assert by_seed[(label, 1)]["quality"] == by_seed[(label, 0)]["quality"]


def test_a_seed_free_method_is_scored_once_for_every_seed(tmp_path):
    """SQNR draws no seed: seed 1 gets seed 0's scores (the same floats) without scoring again, and the search
    time counts the one scoring."""
    out = tmp_path / "study"
    args = ["study", "frontier", "digits-cnn-ptq", "--methods", "sqnr", "--seeds", "2", "--budgets", "1.0",
            "--workers", "1", "--additivity", "0", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "digits-cnn-ptq" / "scores.jsonl").read_text().splitlines()]
    first, second = sorted(rows, key=lambda r: r["seed"])
    assert "scores_from_seed" not in first and second["scores_from_seed"] == 0 and second["seed"] == 1
    assert second["scores"] == first["scores"] and second["score_s"] == first["score_s"]
    timing = json.loads((out / "digits-cnn-ptq" / "frontier.json").read_text())["search_time"]["methods"]["sqnr"]
    assert (timing["seeds"], timing["scored_seeds"]) == (2, 1)
