"""`bitmix study frontier --quick`: outputs, JSON structure, infeasible budgets and resuming."""

from __future__ import annotations

import json

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


def test_study_methods_and_options_come_from_the_registry():
    from bitmix.compiler.sensitivity import ALPSConfig, HAWQConfig
    from bitmix.study import all_methods, default_config

    config = default_config("minilm")
    assert config.methods == all_methods() and {"eagl", "alps", "uniform"} <= set(config.methods)
    assert config.method("alps") == ALPSConfig(epochs=0.25, calibration_size=32, batch_size=32)
    assert config.method("hawq") == HAWQConfig(samples=8, examples=64)
    assert config.method("eagl") == "eagl"  # no study options: the registered defaults
