"""The study's knapsack vs Pareto-greedy rows, EAGL vs random, and the shared training timed apart."""

from __future__ import annotations

import json

import pytest

from bitmix.cli import main
from bitmix.study import default_config
from bitmix.study.config import GREEDY_SUFFIX
from bitmix.study.stats import knapsack_vs_greedy, versus


def _point(method: str, seed: int, quality: float, assignment: dict[str, int], fraction: float) -> dict:
    return {"method": method, "seed": seed, "budget": 0.8, "status": "ok", "quality": quality,
            "assignment": assignment, "fraction": fraction, "predicted": sum(assignment.values())}


def test_knapsack_minus_greedy_is_per_seed_and_counts_identical_assignments():
    config = default_config("digits-cnn", methods=["eagl", "random"], budgets=[0.8], seeds=2)
    a, b = {"x": 4, "y": 2}, {"x": 2, "y": 4}
    ok = [_point("eagl", 0, 99.0, a, 0.79), _point("eagl" + GREEDY_SUFFIX, 0, 98.0, b, 0.75),
          _point("eagl", 1, 97.0, a, 0.79), _point("eagl" + GREEDY_SUFFIX, 1, 97.0, a, 0.79),
          _point("random", 0, 98.5, b, 0.7), _point("random", 1, 96.0, b, 0.7)]
    (row,) = knapsack_vs_greedy(config, ok)  # random has no scores to allocate greedily
    assert (row["method"], row["budget"], row["n"], row["same_assignment"]) == ("eagl", 0.8, 2, 1)
    assert row["quality_gap"] == 0.5 and abs(row["quality_gap_std"] - 0.7071) < 1e-3
    assert (row["knapsack_fraction"], row["greedy_fraction"]) == (0.79, 0.77)
    (vs,) = versus(config, ok, "eagl", "random")
    assert vs["gap"] == 0.75 and (vs["method_mean"], vs["other_mean"]) == (98.0, 97.25)


@pytest.mark.slow  # ~40 s alone: EAGL's training at the highest choice, fine-tunes
def test_quick_study_reports_knapsack_vs_greedy_and_pretrain(tmp_path):
    out, page = tmp_path / "study", tmp_path / "docs" / "results.md"
    args = ["study", "frontier", "digits-mlp", "--quick", "--workers", "1", "--methods", "eagl", "random",
            "--budgets", "0.9", "1.0", "--out", str(out), "--results", str(page)]
    assert main(args) == 0
    result = json.loads((out / "digits-mlp" / "frontier.json").read_text())
    assert result["costs"] == "exact"
    greedy = [p for p in result["points"] if p["method"] == "eagl" + GREEDY_SUFFIX and p["status"] == "ok"]
    assert {p["budget"] for p in greedy} == {0.9, 1.0}
    assert all(p["strategy"] == "pareto-greedy" and p["fraction"] <= p["budget"] + 1e-9 for p in greedy)
    rows = {r["budget"]: r for r in result["knapsack_vs_greedy"]}
    assert set(rows) == {0.9, 1.0} and {r["method"] for r in rows.values()} == {"eagl"}
    assert all(r["knapsack_predicted"] <= r["greedy_predicted"] + 1e-9 for r in rows.values())  # exact ≤ greedy
    assert [r["budget"] for r in result["vs_random"]] == [0.9, 1.0]
    eagl = result["search_time"]["methods"]["eagl"]
    assert eagl["pretrain_trained"] + eagl["pretrain_cached"] == 1 and "greedy_allocate_s_median" in eagl
    text = page.read_text()
    assert "Knapsack vs Pareto-greedy" in text and "| eagl | 0.9 |" in text
    assert "**(e) Exactness" in text and "**(f) Issue 13's acceptance" in text
