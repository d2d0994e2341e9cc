"""Markdown for the study: one section per model (README.md next to its figures) and the results page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bitmix.errors import BitmixError
from bitmix.study.config import MODELS, OTHER_STUDIES, PROPOSED
from bitmix.study.plots import plot_additivity, plot_frontier
from bitmix.study.sections import (
    chips_note,
    claims_extra,
    knapsack_vs_greedy,
    pretrain_note,
    scope_note,
    setup_notes,
    versus_random,
)


def write_outputs(result: dict, out: Path) -> None:
    """frontier.json, search_time.json, frontier.png, additivity.png and README.md in `out`."""
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    (out / "search_time.json").write_text(json.dumps(result["search_time"], indent=1))
    plot_frontier(result, out / "frontier.png")
    if result["additivity"]:
        plot_additivity(result, out / "additivity.png")
    (out / "README.md").write_text(model_section(result, heading="#", images=("frontier.png", "additivity.png")))


def _target(result: dict) -> str:
    return result.get("target", "int4int2-npu")


def _highest(result: dict) -> str:
    """The reference every budget is a fraction of: all-4 (int4int2-npu) or all-4/8 (w4a8-npu)."""
    return next((k for k in result["references"] if k != "all-8"), "all-4")


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _fps(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} k" if x >= 1e3 else f"{x:.0f}"


def model_section(result: dict, heading: str = "##", images: tuple[str, str] | None = None) -> str:
    """Markdown for one model: frontier table, references, dominance, search time, additivity."""
    cfg = result["config"]
    r = cfg["recipe"]
    recipe = ("no fine-tuning after allocation (post-training quantization: LSQ steps from calibration only)"
              if r["epochs"] == 0 else f"{r['epochs']} epoch(s) LSQ, {r['optimizer']} lr {r['lr']:g}, "
              f"batch {r['batch_size']}")
    lines = [f"{heading} {result['model']}", "",
             f"{result['layers']} quantizable layers ({result['free_layers']} free, first/last pinned at 8 bits), "
             f"FP32 {result['metric']} {result['fp32']:.2f} %; target `{_target(result)}`; cheapest assignment = "
             f"{result['min_fraction']:.3f} of the {_highest(result)} cost. Recipe: {recipe}; seeds {cfg['seeds']}; "
             f"method options {cfg['method_options']}; quality measured on the packed kernels. Study wall time "
             f"{result['study_wall_s'] / 60:.1f} min ({len(result['runs'])} run(s), {cfg['workers']} worker "
             f"process(es)); {chips_note(result)}.", ""]
    scope = scope_note(result)
    if scope:
        lines += [f"**{scope[0].upper() + scope[1:]}.**", ""]
    lines += [f"Setup: {'; '.join(setup_notes(result))}.", ""] if setup_notes(result) else []
    if "costs" not in result:
        lines += ["**Not regenerated: from the previous study (approximate simulator costs, EAGL on initial "
                  "steps without the training at the highest choice).**", ""]
    if images:
        lines += [f"![frontier]({images[0]})", ""]
    budgets = cfg["budgets"]
    lines += [f"Quality (%, mean ± std over seeds) per budget (fraction of {_highest(result)} simulated cycles):",
              "",
              "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for method, rows in result["frontier"].items():
        cells = {row["budget"]: (_pm(row["quality_mean"], row["quality_std"]) if row["status"] == "ok"
                                 else f"infeasible (min {row['min_fraction']:.3f})") for row in rows}
        lines.append(f"| {method} | " + " | ".join(cells.get(b, "–") for b in budgets) + " |")
    fps_row = {}
    for rows in result["frontier"].values():
        for row in rows:
            if row["status"] == "ok":
                fps_row.setdefault(row["budget"], []).append(row["fps_mean"])
    lines.append("| *sim. frames/s* | " + " | ".join(
        f"{_fps(min(fps_row[b]))}–{_fps(max(fps_row[b]))}" if b in fps_row else "–" for b in budgets) + " |")
    lines += ["", "Uniform references (same fine-tune; all-8 = every layer at 8 bits, the mixed-npu-style "
              "reference):", "",
              f"| reference | quality % | sim. frames/s | energy/frame | cost vs {_highest(result)} |",
              "|---|---|---|---|---|"]
    for name, ref in result["references"].items():
        lines.append(f"| {name} | {_pm(ref['quality_mean'], ref['quality_std'])} | {_fps(ref['fps_mean'])} | "
                     f"{ref['energy_per_frame_j_mean'] * 1e6:.3f} µJ | {ref['fraction_mean']:.3f} |")
    if result["dominance"]:
        lines += ["", "Dominance: mean quality of EAGL / ALPS minus the best other method at the same budget "
                  "(pp; ± = std over seeds of the per-seed gap):", "",
                  "| budget | best other (mean %) | EAGL − best | ALPS − best | EAGL − HAWQ | ALPS − HAWQ |",
                  "|---|---|---|---|---|---|"]
        for d in result["dominance"]:
            cells = [_pm(d.get(f"{m}_minus_best"), d.get(f"{m}_minus_best_std")) for m in PROPOSED]
            hawq = [f"{d[f'{m}_minus_hawq']:+.2f}" if f"{m}_minus_hawq" in d else "–" for m in PROPOSED]
            lines.append(f"| {d['budget']:g} | {d['best_other']} ({d['best_other_mean']:.2f}) | "
                         + " | ".join(cells + hawq) + " |")
    lines += knapsack_vs_greedy(result) + versus_random(result)
    st = result["search_time"]
    lines += ["", f"Search time to a solution (score + one knapsack solve; wall s on the shared machine, median "
              f"over seeds, scoring also mean ± std; {st['workers']} worker process(es) for ALPS):", "",
              "| method | score s (mean ± std) | knapsack ms | greedy ms | solution s (median) | × EAGL | "
              "shared training s (not in score s) |", "|---|---|---|---|---|---|---|"]
    for method, e in st["methods"].items():
        greedy = e.get("greedy_allocate_s_median")
        trained = e.get("pretrain_s_median")
        lines.append(f"| {method} | {_pm(e['score_s_mean'], e['score_s_std'], 3)} | "
                     f"{e['allocate_s_median'] * 1e3:.2f} | {'–' if greedy is None else f'{greedy * 1e3:.2f}'} | "
                     f"{e['solution_s_median']:.3f} | {e.get('times_eagl', float('nan')):.3g} | "
                     + ("–" if trained is None else f"{trained:.1f}") + " |")
    lines += pretrain_note(result)
    alps = st["methods"].get("alps")
    if alps:
        lines += ["", f"ALPS: {alps['jobs']} per-layer fine-tune jobs per seed (1 reference + one per free layer "
                  f"at 2 bits), {alps['wall_s_per_job']:.2f} s wall per job, options {alps['options']}."]
    add = result["additivity"]
    if add:
        lines += ["", f"Additivity: random subsets of the {add['free_layers']} free layers lowered to 2 bits, each "
                  f"fine-tuned {add['finetune_epochs']} epoch(s) (Adam lr {add['lr']:g}); measured test-loss "
                  f"increase vs {_highest(result)} against the summed seed-0 scores (Spearman ρ, p):", "",
                  "| subsets | " + " | ".join(next(iter(add["sets"].values()))["methods"]) + " |",
                  "|---|" + "---|" * len(next(iter(add["sets"].values()))["methods"])]
        for name, entry in add["sets"].items():
            label = f"{name} ({add['n']}, " + ("1..all lowered)" if name == "spread" else "half lowered)")
            lines.append(f"| {label} | " + " | ".join(
                "n/a" if e["rho"] is None else f"{e['rho']:.2f} ({e['pvalue']:.1g})"
                for e in entry["methods"].values()) + " |")
        if images:
            lines += ["", f"![additivity]({images[1]})"]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- results page


def render_results(study_dir: str | Path, results_path: str | Path, command: str = "") -> Path:
    """Gather every `<study_dir>/<model>/frontier.json` into one markdown page with its figures copied
    next to it (`<model>-frontier.png|json`, `<model>-additivity.png`, `<model>-search_time.json`)."""
    study, page = Path(study_dir), Path(results_path)
    page.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads((study / m / "frontier.json").read_text()) for m in MODELS + OTHER_STUDIES
               if (study / m / "frontier.json").exists()]
    if not results:
        raise BitmixError(f"no frontier.json under {study}/<model>/; run `bitmix study frontier` first")
    sections = []
    for res in results:
        m, src = res["model"], study / res["model"]
        for name, dest in (("frontier.png", f"{m}-frontier.png"), ("additivity.png", f"{m}-additivity.png"),
                           ("frontier.json", f"{m}-frontier.json"), ("search_time.json", f"{m}-search_time.json")):
            if (src / name).exists():
                shutil.copyfile(src / name, page.parent / dest)
        sections.append(model_section(res, images=(f"{m}-frontier.png", f"{m}-additivity.png")))
    mach = results[0]["machine"]
    header = [
        "# bitmix: accuracy–throughput frontier study (EAGL, ALPS, HAWQ-v3, LIMPQ, SQNR, uniform, random)", "",
        f"Regenerate: `{command}`" if command else "", "",
        f"Run on {mach['cpu']} ({mach['cores']} logical cores, SIMD {', '.join(mach['simd']) or 'none'}; "
        f"torch {mach['torch']}), {results[0]['date']}. Costs: NorthPole-style simulator, targets "
        "`int4int2-npu` (free layers 4 or 2 bits, first / last quantizable layer pinned at 8) and, for the "
        "`-w4a8` studies, `w4a8-npu` (free layers 4/8 or 2/8 = weight/activation bits, first / last at 8/8); "
        "budgets are fractions of the all-highest-choice cost (all-4, resp. all-4/8) on the simulator's "
        "exact costs (`bitmix.simulator.price` equals `simulate()`, the knapsack budgets it exactly). "
        "Per-model commands "
        "as run: " + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in results if r.get("command")))
        + ".", "",
    ]
    absent = [m for m in MODELS if m not in {r["model"] for r in results}]
    if absent:
        header += [f"**Not in this version: {', '.join(absent)}** (no results under `{study}/<model>/`; run "
                   f"`bitmix study frontier <model> --out {study} --results {page}`).", ""]
    page.write_text("\n".join(header + overview(results) + claims(results) + claims_extra(results) + sections))
    return page


PROTOCOL = " ".join((
    "Protocol: per model, each method is scored once per seed (EAGL on the model trained at the highest choice,",
    "trained once per seed, or once for all seeds where the model's setup says so, and timed apart from its",
    "scoring; the -ptq studies too, as the task has data); per budget the exact knapsack (or the method's",
    "baseline strategy) allocates the target's choices, and every knapsack method's scores are also allocated",
    "by AIMET AMP's Pareto-greedy search; the assignment is fake-quantized (LSQ, 128 calibration examples),",
    "fine-tuned with the model's one recipe (same seed = same batches for every method; none in the -ptq",
    "studies), lowered onto the packed int kernels and evaluated there; throughput and energy/frame are the",
    "simulator's. Budgets below the cheapest assignment are reported as infeasible. Identical (assignment,",
    "seed) pairs are fine-tuned once and shared (in -ptq studies run by this version, identical assignments, as",
    "nothing there depends on the seed). LIMPQ is scored on a train-mode copy of the prepared model (its",
    "per-bit quantizers have no integer path, which eval-mode no-grad inference now takes). Wall times are on",
    "a 2-core machine shared with other jobs, so single timings can stall; medians are used for the",
    "search-time ratios."))


def scoring_s(result: dict) -> float:
    """Wall seconds spent scoring, summed over methods and seeds (cached scores count: they were paid once; a
    seed-free method's, scored once for every seed, count once)."""
    return sum(e["score_s_mean"] * e.get("scored_seeds", e["seeds"]) for e in result["search_time"]["methods"].values())


def overview(results: list[dict]) -> list[str]:
    """What ran where: sizes, feasible budgets, seeds, wall time, ALPS cost; then the protocol in brief."""
    lines = ["## Overview", "", "| model | layers (free) | cheapest / all-4 | feasible budgets | seeds | points "
             "measured | study wall time | of which scoring (all methods × seeds) | ALPS jobs per seed × s/job | "
             "test examples (1 example =) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        cfg = res["config"]
        feasible = sorted({r["budget"] for rows in res["frontier"].values() for r in rows if r["status"] == "ok"})
        measured = sum(1 for p in res["points"] if p["status"] == "ok")
        alps = res["search_time"]["methods"].get("alps")
        n_test = res.get("test_examples")
        lines.append(
            f"| {res['model']} | {res['layers']} ({res['free_layers']}) | {res['min_fraction']:.3f} | "
            f"{', '.join(f'{b:g}' for b in feasible)} | {cfg['seeds']} | {measured} | "
            f"{res['study_wall_s'] / 60:.1f} min | {scoring_s(res) / 60:.1f} min | "
            + (f"{alps['jobs']} × {alps['wall_s_per_job']:.2f} s" if alps else "–") + " | "
            + (f"{n_test} ({100 / n_test:.2f} pp)" if n_test and res["metric"] == "top1" else str(n_test or "–"))
            + " |")
    lines += ["", "Study wall time sums every run, an interrupted one up to its last result (stores written before "
              "2026-12-07 recorded only the runs that completed, and then scoring can exceed the wall time shown).",
              "",
              PROTOCOL, ""]
    for res in results:
        if res["free_layers"] <= 1:
            lines.append(f"- {res['model']}: only {res['free_layers']} free layer, so every method picks the same "
                         "assignment at every budget; it cannot separate methods, only test the pipeline.")
        # below the cheapest assignment of any method; a budget only uniform precision cannot meet is not one
        infeasible = sorted({r["budget"] for rows in res["frontier"].values() for r in rows
                             if r["status"] == "infeasible" and r["budget"] < res["min_fraction"]})
        if infeasible:
            lines.append(f"- {res['model']}: budgets {', '.join(f'{b:g}' for b in infeasible)} are infeasible "
                         f"(the cheapest {_target(res)} assignment costs {res['min_fraction']:.3f} of "
                         f"{_highest(res)} on the simulator).")
    lines.append("")
    return lines


def claims(results: list[dict]) -> list[str]:
    """One paragraph per seed-paper claim, stated from the measured numbers with a fixed criterion."""
    lines = ["## The seed paper's claims, as measured", "",
             "Each claim below states its criterion; a claim that does not reproduce says so, with the numbers. "
             "EAGL's times in (d) exclude the training at the highest choice it scores on (reported per model).",
             ""]
    a, b, c, d = [], [], [], []
    for res in results:
        m, ref8 = res["model"], res["references"].get("all-8")
        if ref8 is None:
            continue
        tol = max(0.5, ref8["quality_std"])
        mixes = [r for p in PROPOSED for r in res["frontier"].get(p, []) if r["status"] == "ok" and r["budget"] < 1.0]
        recovered = [r for r in mixes if r["quality_mean"] >= ref8["quality_mean"] - tol]
        best_mix = min(recovered, key=lambda r: (r["budget"], -r["quality_mean"])) if recovered else None
        if best_mix:
            a.append(f"**{m}: reproduced.** At budget {best_mix['budget']:g} of the {_highest(res)} cost a mix "
                     f"scores {best_mix['quality_mean']:.2f} ± {best_mix['quality_std']:.2f} % vs all-8 "
                     f"{ref8['quality_mean']:.2f} ± {ref8['quality_std']:.2f} % (FP32 {res['fp32']:.2f}), at "
                     f"{best_mix['fps_mean'] / ref8['fps_mean']:.2f}× the all-8 simulated throughput.")
        else:
            top = max(mixes, key=lambda r: r["quality_mean"]) if mixes else None
            detail = (f"the best EAGL/ALPS mix below {_highest(res)} reaches {top['quality_mean']:.2f} % at budget "
                      f"{top['budget']:g}" if top else f"no budget below {_highest(res)} is feasible for a mix")
            a.append(f"**{m}: not reproduced.** All-8 scores {ref8['quality_mean']:.2f} ± {ref8['quality_std']:.2f} "
                     f"%; {detail} (criterion: within max(0.5 pp, all-8 std)).")
        for method in PROPOSED:
            verdicts = []
            for row in res["dominance"]:
                key = f"{method}_minus_best"
                if key not in row or row["budget"] >= 1.0:
                    continue
                gap, spread = row[key], row[f"{key}_std"]
                tag = "better" if gap > spread else "worse" if gap < -spread else "tie"
                verdicts.append(f"{row['budget']:g}: {gap:+.2f} ± {spread:.2f} ({tag} vs {row['best_other']})")
            if verdicts:
                b.append(f"**{m}, {method.upper()}:** " + "; ".join(verdicts) + ".")
        sets = res["additivity"].get("sets", {}) if res["additivity"] else {}
        for method in ("alps", "eagl"):
            found = [(name, entry["methods"][method]) for name, entry in sets.items()
                     if method in entry["methods"] and entry["methods"][method]["rho"] is not None]
            if found:
                parts = [f"{name}: ρ = {e['rho']:.2f} (p = {e['pvalue']:.2g}) — "
                         f"{'holds' if e['rho'] >= 0.7 and e['pvalue'] < 0.05 else 'does not hold'}"
                         for name, e in found]
                c.append(f"**{m}, {method.upper()}** (n = {res['additivity']['n']} per set): " + "; ".join(parts) + ".")
        st = res["search_time"]["methods"]
        if "eagl" in st and any(k in st for k in ("alps", "hawq", "limpq")):
            ratios = ", ".join(f"{k.upper()} {v['times_eagl']:.0f}× ({v['solution_s_median']:.2f} s)"
                               for k, v in st.items() if k in ("alps", "hawq", "limpq", "sqnr"))
            slowest = max((v["times_eagl"] for k, v in st.items() if k in ("alps", "hawq", "limpq")), default=0)
            trained = st["eagl"].get("pretrain_s_median")
            extra = f" (+ {trained:.1f} s training at the highest choice, not counted)" if trained is not None else ""
            d.append(f"**{m}: {'reproduced' if slowest >= 100 else 'not reproduced'}** — EAGL takes "
                     f"{st['eagl']['solution_s_median']:.3f} s{extra}; the others take: {ratios}.")
    lines += ["**(a) A mix of 4- and 2-bit layers recovers the accuracy of the higher-precision (all-8) network "
              "at a much lower compute budget.** Criterion: the lowest budget < 1.0 where EAGL or ALPS is within "
              "max(0.5 pp, all-8 seed std) of all-8.", ""] + [f"- {x}" for x in a]
    lines += ["", "**(b) EAGL and ALPS give a better accuracy–throughput frontier than the other methods, "
              "HAWQ-v3 included.** Per feasible budget below 1.0: mean gap to the best other method (pp) ± std "
              "of the per-seed gap; *better*/*worse* when the gap exceeds its spread, else *tie*.", ""]
    lines += [f"- {x}" for x in b]
    lines += ["", "**(c) Per-layer contributions are additive (which justifies the knapsack).** Criterion: "
              "Spearman ρ ≥ 0.7 with p < 0.05 (two-sided, exact over all pairings at small n) between summed scores "
              "and the measured loss increase of random 2-bit subsets; *spread* subsets lower 1..all layers, *fixed* "
              "subsets exactly half (the harder test: the count of lowered layers cannot carry ρ).", ""]
    lines += [f"- {x}" for x in c]
    lines += ["", "**(d) EAGL reaches a solution orders of magnitude faster.** Criterion: ≥ 100× faster than "
              "the slowest data-driven method (ALPS, HAWQ, LIMPQ).", ""] + [f"- {x}" for x in d]
    lines.append("")
    return lines
