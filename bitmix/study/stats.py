"""Summaries of the measured points: mean ± std per method and budget, dominance, search time, the machine."""

from __future__ import annotations

import datetime
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.targets import get_target
from bitmix.study.config import COSTS, GREEDY_SUFFIX, PROPOSED, StudyConfig, references

ZEN = {"23": ("Zen/Zen 2", "Zen/Zen 2"), "25": ("Zen 3", "Zen 4"), "26": ("Zen 5", "Zen 5")}  # cpu family, AVX-512


def _stats(values: Iterable[float]) -> tuple[float, float]:
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(config: StudyConfig, points: list[dict], scored: dict, additivity: dict, **meta: Any) -> dict:
    """frontier.json: per method and budget mean ± std over seeds, references, dominance, search time."""
    ok = [p for p in points if p["status"] == "ok"]
    lowest = get_target(config.target).lowest
    frontier: dict[str, list[dict]] = {}
    for method in config.methods:
        rows = []
        for budget in config.budgets:
            pts = [p for p in points if p["method"] == method and p["budget"] == budget]
            good = [p for p in pts if p["status"] == "ok"]
            if not pts:
                continue
            if not good:
                rows.append({"budget": budget, "status": "infeasible", "min_fraction": pts[0]["min_fraction"]})
                continue
            rows.append({"budget": budget, "status": "ok", "n": len(good), **_agg(good, lowest)})
        frontier[method] = rows
    refs = {}
    for label, _ in references(get_target(config.target)):
        good = [p for p in ok if p["method"] == label]
        if good:
            refs[label] = {"n": len(good), **_agg(good, lowest)}
    return {
        "model": config.label, "zoo_model": config.model, "target": config.target, "costs": COSTS, **meta,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "config": asdict(config) | {"fingerprint": config.fingerprint()},
        "frontier": frontier, "references": refs,
        "dominance": dominance(config, ok), "search_time": search_time(config, scored, ok),
        "knapsack_vs_greedy": knapsack_vs_greedy(config, ok), "vs_random": versus(config, ok, "eagl", "random"),
        "additivity": additivity, "points": sorted(points, key=lambda p: (p["method"], p["seed"], p["budget"] or 0)),
    }


def _agg(points: list[dict], lowest: Precision) -> dict[str, Any]:
    """Means over seeds; a layer is lowered when at the target's lowest choice (2 bits, or 2/8 on w4a8-npu)."""
    quality, qstd = _stats(p["quality"] for p in points)
    fps, fps_std = _stats(p["throughput_fps"] for p in points)
    energy, _ = _stats(p["energy_per_frame_j"] for p in points)
    fraction, _ = _stats(p["fraction"] for p in points)
    row = {"quality_mean": quality, "quality_std": qstd, "fps_mean": fps, "fps_std": fps_std,
           "energy_per_frame_j_mean": energy, "fraction_mean": fraction,
           "lowered_layers_mean": statistics.fmean(sum(1 for b in p["assignment"].values() if as_precision(b) == lowest)
                                                   for p in points),
           "chips_max": max(p.get("chips", 1) for p in points)}
    if all("quality_fake_quant" in p for p in points):
        row["quality_fake_quant_mean"] = statistics.fmean(p["quality_fake_quant"] for p in points)
    details = set.intersection(*(set(p.get("details", {})) for p in points))
    for key in sorted(details - {"cosine"}):  # the task's own metrics, e.g. nn_agreement for minilm
        row[f"{key}_mean"] = statistics.fmean(p["details"][key] for p in points)
    return row


def dominance(config: StudyConfig, ok: list[dict]) -> list[dict]:
    """Per budget: EAGL / ALPS mean quality minus the best other method's, and the seed spread of that gap."""
    others = [m for m in config.methods if m not in PROPOSED]
    rows = []
    for budget in config.budgets:
        by_method = {m: {p["seed"]: p["quality"] for p in ok if p["method"] == m and p["budget"] == budget}
                     for m in config.methods}
        present = [m for m in others if by_method[m]]
        if not present:
            continue
        best = max(present, key=lambda m: statistics.fmean(by_method[m].values()))
        row: dict[str, Any] = {"budget": budget, "best_other": best,
                               "best_other_mean": statistics.fmean(by_method[best].values())}
        if "hawq" in present:
            row["hawq_mean"] = statistics.fmean(by_method["hawq"].values())
        for method in PROPOSED:
            seeds = sorted(set(by_method.get(method, {})) & set(by_method[best]))
            if not seeds:
                continue
            gaps = [by_method[method][s] - by_method[best][s] for s in seeds]
            mean, std = _stats(gaps)
            row[f"{method}_minus_best"] = mean
            row[f"{method}_minus_best_std"] = std
            if "hawq" in present:
                row[f"{method}_minus_hawq"] = statistics.fmean(
                    by_method[method][s] - by_method["hawq"][s] for s in seeds if s in by_method["hawq"])
        rows.append(row)
    return rows


def _by_seed(ok: list[dict], method: str, budget: float) -> dict[int, dict]:
    return {p["seed"]: p for p in ok if p["method"] == method and p["budget"] == budget}


def knapsack_vs_greedy(config: StudyConfig, ok: list[dict]) -> list[dict]:
    """Per knapsack method and budget: the exact knapsack minus AIMET AMP's Pareto-greedy search on the
    same scores (quality, pp, mean ± std of the per-seed gap), with each one's achieved cost fraction,
    predicted Σ score and how many seeds chose the very same assignment."""
    rows = []
    for method in config.methods:
        for budget in config.budgets:
            exact, greedy = _by_seed(ok, method, budget), _by_seed(ok, method + GREEDY_SUFFIX, budget)
            seeds = sorted(set(exact) & set(greedy))
            if not seeds:
                continue
            gap, gap_std = _stats(exact[s]["quality"] - greedy[s]["quality"] for s in seeds)
            rows.append({"method": method, "budget": budget, "n": len(seeds), "quality_gap": gap,
                         "quality_gap_std": gap_std,
                         "knapsack_quality": statistics.fmean(exact[s]["quality"] for s in seeds),
                         "greedy_quality": statistics.fmean(greedy[s]["quality"] for s in seeds),
                         "knapsack_fraction": statistics.fmean(exact[s]["fraction"] for s in seeds),
                         "greedy_fraction": statistics.fmean(greedy[s]["fraction"] for s in seeds),
                         "knapsack_predicted": statistics.fmean(exact[s]["predicted"] for s in seeds),
                         "greedy_predicted": statistics.fmean(greedy[s]["predicted"] for s in seeds),
                         "same_assignment": sum(exact[s]["assignment"] == greedy[s]["assignment"] for s in seeds)})
    return rows


def versus(config: StudyConfig, ok: list[dict], method: str, other: str) -> list[dict]:
    """Per budget: `method` minus `other` (pp, mean ± std of the per-seed gap)."""
    rows = []
    for budget in config.budgets:
        mine, theirs = _by_seed(ok, method, budget), _by_seed(ok, other, budget)
        seeds = sorted(set(mine) & set(theirs))
        if seeds:
            gap, gap_std = _stats(mine[s]["quality"] - theirs[s]["quality"] for s in seeds)
            rows.append({"budget": budget, "method": method, "other": other, "n": len(seeds), "gap": gap,
                         "gap_std": gap_std, "method_mean": statistics.fmean(mine[s]["quality"] for s in seeds),
                         "other_mean": statistics.fmean(theirs[s]["quality"] for s in seeds)})
    return rows


def search_time(config: StudyConfig, scored: dict, ok: list[dict]) -> dict:
    """Wall time to a solution per method: scoring (once per seed) + one knapsack solve.

    Medians over seeds (the machine is shared, so single runs can stall); mean ± std of scoring kept too.
    """
    out: dict[str, Any] = {"workers": config.workers, "methods": {}}
    for method in config.methods:
        rows = [r for (m, _), r in scored.items() if m == method]
        if not rows:
            continue
        paid = [r for r in rows if "scores_from_seed" not in r] or rows  # a seed-free method is scored once
        score_mean, score_std = _stats(r["score_s"] for r in paid)
        score_median = statistics.median(r["score_s"] for r in paid)
        solves = [p["allocate_s"] for p in ok if p["method"] == method and "allocate_s" in p]
        solve = statistics.median(solves) if solves else 0.0
        entry = {"score_s_mean": score_mean, "score_s_std": score_std, "score_s_median": score_median,
                 "allocate_s_median": solve, "solution_s_median": score_median + solve, "seeds": len(rows),
                 "scored_seeds": len(paid)}
        greedy = [p["allocate_s"] for p in ok if p["method"] == method + GREEDY_SUFFIX and "allocate_s" in p]
        if greedy:
            entry["greedy_allocate_s_median"] = statistics.median(greedy)
        trained = [r for r in rows if "pretrain_s" in r]
        if trained:  # the shared training at the highest choice, apart from the method's own scoring
            fresh = [r["pretrain_s"] for r in trained if not r["pretrain_cached"]]
            entry |= {"pretrain_s_median": statistics.median(fresh) if fresh else None,
                      "pretrain_trained": len(fresh), "pretrain_cached": len(trained) - len(fresh)}
        if method == "alps":
            jobs = rows[0]["jobs"]
            entry |= {"jobs": jobs, "wall_s_per_job": score_median / jobs,
                      "options": config.method_options.get("alps", {})}
        out["methods"][method] = entry
    eagl = out["methods"].get("eagl")
    if eagl:
        for entry in out["methods"].values():
            entry["times_eagl"] = entry["solution_s_median"] / max(eagl["solution_s_median"], 1e-9)
    return out


def machine() -> dict[str, Any]:
    """CPU model, logical cores, SIMD flags: the numbers here are wall times on this machine."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    model = info.get("model name", "unknown")
    if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") in ZEN:  # the name may omit the core
        model += f" ({ZEN[info['cpu family']][int('avx512f' in flags)]})"
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd, "torch": torch.__version__}
