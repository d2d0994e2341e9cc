"""The results page's overview: what it states about feasible and infeasible budgets."""

from __future__ import annotations

from bitmix.study.render import overview


def _row(budget: float, ok: bool, min_fraction: float) -> dict:
    return {"budget": budget, "status": "ok" if ok else "infeasible", "min_fraction": min_fraction}


def _result() -> dict:
    """Cheapest assignment 0.6 of all-4; uniform precision can only reach 0.8 (all its layers drop together)."""
    frontier = {"sqnr": [_row(0.5, False, 0.6), _row(0.7, True, 0.6), _row(1.0, True, 0.6)],
                "uniform": [_row(0.5, False, 0.8), _row(0.7, False, 0.8), _row(1.0, True, 0.8)]}
    return {"model": "net", "layers": 5, "free_layers": 3, "min_fraction": 0.6, "config": {"seeds": 2},
            "frontier": frontier, "points": [{"status": "ok"}], "study_wall_s": 60.0, "metric": "top1",
            "search_time": {"methods": {"sqnr": {"score_s_mean": 1.0, "seeds": 2}}}, "references": {"all-4": {}}}


def test_infeasible_note_lists_only_budgets_below_the_cheapest_assignment():
    notes = [line for line in overview([_result()]) if line.startswith("- net: budgets")]
    assert notes == ["- net: budgets 0.5 are infeasible (the cheapest int4int2-npu assignment costs 0.600 of "
                     "all-4 on the simulator)."]


def test_overview_row_lists_the_budgets_some_method_met():
    row = next(line for line in overview([_result()]) if line.startswith("| net |"))
    assert "| 0.7, 1 |" in row


def test_additivity_verdict_at_four_assignments_does_not_hold():
    """A perfect ranking of 4 has exact p = 1/12 > 0.05: the claim's criterion is not met."""
    from bitmix.study.drops import correlate
    from bitmix.study.render import claims

    names = ["a", "b", "c", "d"]
    assignments = [{name: 2 for name in names[: k + 1]} for k in range(4)]
    r = correlate({name: {2: float(i + 1)} for i, name in enumerate(names)}, assignments, [0.001, 0.01, 0.05, 0.16])
    res = _result() | {"fp32": 97.0, "dominance": [],
                       "references": {"all-4": {}, "all-8": {"quality_mean": 96.0, "quality_std": 0.1}},
                       "additivity": {"n": 4, "sets": {"spread": {"methods": {"alps": {"rho": r.rho,
                                                                                        "pvalue": r.pvalue}}}}}}
    line = next(x for x in claims([res]) if x.startswith("- **net, ALPS** (n = 4"))
    assert "spread: ρ = 1.00 (p = 0.083) — does not hold" in line
