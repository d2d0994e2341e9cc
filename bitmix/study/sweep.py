"""Accuracy–throughput frontier study: every method × budget × seed on one model, resumable.

This is a sweep harness over the same stage functions that `bitmix.compiler.pipeline.compile`
calls in order (capture → price → prepare → score → allocate → fake-quantize → fine-tune →
lower → evaluate). It does not replace the pipeline, which stays the only place that runs one
compile; it reorders the work of many compiles so that each (method, seed) is scored once and
its scores are reused for every budget. Per (method, seed, budget) it allocates with the exact
knapsack (or the method's baseline strategy), LSQ fine-tunes with one fixed recipe, lowers onto
the packed kernels and measures quality on the kernels, and prices the assignment on the
simulator (throughput, energy per frame). Uniform all-8 / all-4 / all-2 references get the same
fine-tune. An infeasible budget is recorded with the minimum achievable fraction, never filled in.

Resumable: every scored (method, seed) goes to `scores.jsonl` and every measured point to
`points.jsonl` in the output directory, tagged with a fingerprint of the recipe, so an
interrupted study continues where it stopped. A (assignment, seed) pair is fine-tuned once and
shared by every method and budget that chose it (fine-tuning is deterministic given the seed at
one torch thread). Outputs: `frontier.json`, `frontier.png`, `search_time.json`,
`additivity.png` and `README.md`; `render.render_results` gathers several models into one page.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitmix.compiler import sensitivity
from bitmix.errors import BitmixError
from bitmix.study.additivity import additivity
from bitmix.study.config import GREEDY_SUFFIX, Log, StudyConfig, default_config, references
from bitmix.study.measure import measure
from bitmix.study.render import render_results, write_outputs
from bitmix.study.stats import summarise
from bitmix.study.store import RunClock, append, assignment_key, last_marks, read_jsonl


def _scoring_model(method: str, prepared: nn.Module) -> nn.Module:
    """The prepared model a method scores. LIMPQ swaps in quantizers without integer codes and
    initialises them with one no-grad forward pass, which in eval mode would take the integer
    inference path; a train-mode copy keeps that pass on the fake-quant path (BN is folded, so
    train mode changes nothing else)."""
    return copy.deepcopy(prepared).train() if method == "limpq" else prepared


def sweep_strategies(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, allocation strategy) pairs: each method with its own strategy, and every knapsack method
    also with AIMET AMP's Pareto-greedy search on the same scores, so the study shows what exactness buys."""
    pairs = [(m, sensitivity.strategy(m)) for m in methods]
    return pairs + [(m, "pareto-greedy") for m, s in pairs if s == "knapsack"]


def pretrain(config: StudyConfig, method: str, prepared: nn.Module, names: tuple[str, ...], target: Any,
             data: Any, seed: int) -> Any:
    """The training at the highest choice a method scores on (`compiler/pretrain.py`), or None.

    Once per (model, seed), or once per model with `shared_pretrain` (seed 0's): the cache (memory, then
    disk) shares it between methods, studies and resumed runs; `pretrain_s` is the measured training time
    unless `pretrain_cached` says it was a cache hit."""
    from bitmix.compiler.pretrain import cached_train_at_highest

    method_config = sensitivity.resolve(config.method(method))[1]
    scale = method_config.pretrain_step_lr_scale()
    if scale is None or data.recipe.epochs < 1:
        return None
    return cached_train_at_highest(prepared, names, target, data, step_lr=data.recipe.lr * scale,
                                   seed=0 if config.shared_pretrain else seed)


def limit_data(data: Any, limits: tuple[int, int] | None) -> Any:
    """The task with at most (train, test) examples, evenly spaced over each split (deterministic)."""
    if limits is None:
        return data

    def keep(split: Any, n: int) -> Any:
        return split if len(split) <= n else split.subset(torch.linspace(0, len(split) - 1, n).round().long())

    return dataclasses.replace(data, train=keep(data.train, limits[0]), test=keep(data.test, limits[1]))


def run_frontier(config: StudyConfig, out_dir: str | Path, log: Log | None = None, command: str = "",
                 executor: Any = None) -> dict:
    """Run (or resume) the study `config.label` into `out_dir/<label>/`; returns frontier.json's dict.
    `executor` (None: a local pool of `config.workers`) runs the scoring jobs and the sweep's fine-tunes."""
    say = log or (lambda _msg: None)
    out = Path(out_dir) / config.label
    out.mkdir(parents=True, exist_ok=True)
    fp = config.fingerprint()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if config.workers > 1 else 2)
    try:
        return _run(config, out, fp, say, command, executor)
    finally:
        torch.set_num_threads(threads)


def _run(config: StudyConfig, out: Path, fp: str, say: Log, command: str, executor: Any) -> dict:
    from bitmix import zoo
    from bitmix.compiler.allocate import Budget, allocate, cheapest_fraction
    from bitmix.compiler.capture import capture
    from bitmix.compiler.fold import prepare
    from bitmix.compiler.transport import PortableModel
    from bitmix.ir.targets import get_target
    from bitmix.simulator import price, simulate

    clock = RunClock(out / "runs.jsonl", fp)
    say = clock.marking(say)

    model, example, data = zoo.load(config.model)
    if data is None:
        raise BitmixError(f"model {config.model!r} has no data in the zoo; the study needs it")
    graph = capture(model, example, config.model)
    data = limit_data(data, config.data_limits)
    target = get_target(config.target)
    costs = price(graph, target)
    prepared = prepare(graph)
    calibration = data.calibration(config.point_calibration)
    names = graph.names
    pinned = target.pinned(names)
    free = [n for n in names if n not in pinned]
    highest = simulate(graph, {n: pinned.get(n, target.highest) for n in names}).cycles
    min_fraction = cheapest_fraction(costs)
    fp32 = data.evaluate(prepared)
    seeds = list(range(config.seeds))
    say(f"{config.label}: {len(names)} layers ({len(free)} free), FP32 {data.metric} {fp32:.2f}, "
        f"cheapest assignment {min_fraction:.4f} of all-{target.highest}")

    # 1. score once per (method, seed)
    scores_path, points_path = out / "scores.jsonl", out / "points.jsonl"
    score_fp = config.fingerprint(scores_only=True)
    scored = {(r["method"], r["seed"]): r for r in read_jsonl(scores_path, score_fp)}  # keys read back as Precision
    runner = executor or sensitivity.executor_for(config.workers)
    for method in config.methods:
        for seed in seeds[: config.seeds_of(method)]:
            if (method, seed) in scored:
                continue
            first = scored.get((method, seeds[0]))
            if first is not None and not sensitivity.seeded(config.method(method)):  # the same floats again
                row = first | {"seed": seed, "scores_from_seed": seeds[0]}
                append(scores_path, row)
                scored[(method, seed)] = row
                say(f"  scored {method} seed {seed}: seed {seeds[0]}'s scores (the method draws no seed)")
                continue
            trained = pretrain(config, method, prepared, names, target, data, seed)
            ctx = sensitivity.ScoreContext(graph=graph, target=target, model=_scoring_model(method, prepared),
                                           data=data, calibration=data.calibration(config.calibration_size),
                                           seed=seed, executor=runner, pretrained=trained and trained.model)
            start = time.perf_counter()
            scores = sensitivity.score(config.method(method), ctx)
            row = {"recipe": score_fp, "model": config.model, "method": method, "seed": seed,
                   "score_s": time.perf_counter() - start, "scores": scores}
            if trained is not None:  # the shared training before scoring, timed apart from the method's own
                row |= {"pretrain_s": trained.seconds, "pretrain_cached": trained.cached}
            if method == "alps":
                row["jobs"] = 1 + len(free) * (len(target.choices) - 1)
            append(scores_path, row)
            scored[(method, seed)] = row
            say(f"  scored {method} seed {seed}: {row['score_s']:.1f} s")

    # 2. allocate every (method, seed, budget); references; collect the fine-tunes still to run
    done = {(r["method"], r["seed"], r["budget"]): r for r in read_jsonl(points_path, fp)}
    # With no fine-tuning nothing in a measurement depends on the seed (fixed calibration inputs), so in the
    # PTQ regime an assignment is measured once and shared by every seed that chose it.
    def job_seed(seed: int) -> int:
        return seed if config.recipe.epochs > 0 else 0

    measured = {(assignment_key(r["assignment"]), job_seed(r["seed"])): r for r in done.values()
                if r["status"] == "ok"}
    pending: dict[tuple, list[dict]] = {}

    def simulated(assignment: dict[str, int]) -> dict[str, float]:
        sim = simulate(graph, assignment)
        return {"throughput_fps": sim.throughput_fps, "energy_per_frame_j": sim.energy_per_frame_j,
                "cycles": sim.cycles, "fraction": sim.cycles / highest, "chips": sim.chips}

    def queue(row: dict) -> None:
        job = (assignment_key(row["assignment"]), job_seed(row["seed"]))
        if job in measured:
            keep = ("quality", "quality_fake_quant", "details", "finetune_s", "measure_s")
            row |= {k: measured[job][k] for k in keep if k in measured[job]} | {"reused": True}
            append(points_path, row)
            done[(row["method"], row["seed"], row["budget"])] = row
        else:
            pending.setdefault(job, []).append(row)

    for method, strategy in sweep_strategies(config.methods):
        label = method if strategy == sensitivity.strategy(method) else f"{method}{GREEDY_SUFFIX}"
        for seed in seeds[: config.seeds_of(method)]:
            for budget in config.budgets:
                if (label, seed, budget) in done:
                    continue
                row = {"recipe": fp, "model": config.model, "method": label, "seed": seed, "budget": budget,
                       "min_fraction": min_fraction, "strategy": strategy, "scored_by": method}
                start = time.perf_counter()
                try:
                    alloc = allocate(scored[(method, seed)]["scores"], costs, target, names,
                                     Budget(fraction=budget), strategy=strategy, seed=seed)
                except BitmixError as exc:
                    row |= {"status": "infeasible", "reason": str(exc)}
                    append(points_path, row)
                    done[(label, seed, budget)] = row
                    continue
                row |= {"status": "ok", "allocate_s": time.perf_counter() - start, "assignment": alloc.assignment,
                        "predicted": alloc.objective, "gap": alloc.gap, **simulated(alloc.assignment)}
                queue(row)
    for label, bits in references(target):
        for seed in seeds:
            if (label, seed, None) not in done:
                assignment = {n: pinned.get(n, bits) for n in names}
                queue({"recipe": fp, "model": config.model, "method": label, "seed": seed, "budget": None,
                       "status": "ok", "assignment": assignment, **simulated(assignment)})

    # 3. fine-tune and measure on the kernels (executor jobs; each result is saved as it lands)
    jobs = sorted(pending)
    say(f"  {len(jobs)} fine-tunes to run ({len(done)} points recorded or infeasible), {runner.workers} worker(s)")
    run = partial(measure, prepared=PortableModel(graph, prepared), data=data, calibration=calibration,
                  recipe=config.recipe, check_fake_quant=config.check_fake_quant)
    finished = [0]

    def landed(job: tuple, result: dict) -> None:
        finished[0] += 1
        for row in pending[job]:
            row |= result
            append(points_path, row)
            done[(row["method"], row["seed"], row["budget"])] = row
        first = pending[job][0]
        say(f"  [{finished[0]}/{len(jobs)}] {first['method']} seed {first['seed']} budget {first['budget']}: "
            f"{result['quality']:.2f} ({result['measure_s']:.1f} s)")

    def describe(job: tuple) -> str:
        return f"fine-tune seed {job[1]} of an assignment with layers per bits {dict(Counter(b for _, b in job[0]))}"

    for i, result in runner.as_completed(run, jobs, describe=describe):
        landed(jobs[i], result)

    # 4. additivity: Σ per-layer scores vs measured drop of random mixed assignments
    additivity_result = additivity(config, out, fp, prepared, names, target, data, scored, say)

    # 5. summarise; every run's wall time is kept (up to its last mark if it was interrupted), so a resumed study
    # still reports its total
    clock.mark(fine_tunes=len(jobs), workers=config.workers, finished=datetime.datetime.now(datetime.UTC).isoformat())
    runs = last_marks(read_jsonl(out / "runs.jsonl", fp))
    result = summarise(config, list(done.values()), scored, additivity_result, fp32=fp32, metric=data.metric,
                       min_fraction=min_fraction, layers=len(names), free_layers=len(free), command=command,
                       test_examples=len(data.test),
                       runs=runs, study_wall_s=sum(r["wall_s"] for r in runs))
    write_outputs(result, out)
    say(f"  wrote {out}/frontier.json, frontier.png, search_time.json, additivity.png, README.md "
        f"({runs[-1]['wall_s']:.0f} s this run, {result['study_wall_s']:.0f} s over {len(runs)} run(s))")
    return result


def run_study(models: Sequence[str], out_dir: str | Path, methods: Sequence[str] | None = None,
              budgets: Sequence[float] | None = None, seeds: int | None = None, quick: bool = False,
              workers: int = 2, results: str | Path | None = None, log: Log | None = None,
              executor: Any = None, additivity: int | None = None,
              method_seeds: dict[str, int] | None = None) -> list[dict]:
    """Run the study for each model (resumable), then optionally render the results page.
    `executor`: None / "local" (forked pool of `workers`), "ray" or an executor object."""
    os.environ.setdefault("BITMIX_QUIET", "1")
    command = " ".join(["bitmix", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("bitmix", "cli.py") else " ".join(
        [Path(sys.executable).name, *sys.argv])  # `python -m bitmix.cli` runs what the `bitmix` script runs
    done = []
    with sensitivity.open_executor(executor) as runner:
        for model in models:
            config = default_config(model, methods, budgets, seeds, quick, workers, additivity, method_seeds)
            done.append(run_frontier(config, out_dir, log, command, runner))
    if results is not None:
        render_results(out_dir, results, command)
    return done
