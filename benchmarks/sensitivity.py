"""Sensitivity methods on digits-cnn: wall time, EAGL ablation, accuracy at a budget, additivity, DP speed.

    .venv/bin/python benchmarks/sensitivity.py [--quick] [--json out.json]
    .venv/bin/python benchmarks/sensitivity.py --ablation digits-cnn digits-mlp [--json out.json]

`--ablation` runs only the EAGL ablation (`run_ablation` below): step rule (LSQ init,
MSE, learned after training at the highest choice) x entropy variant, Spearman rho against
the measured per-layer loss increase.

Costs come from the analytic simulator (`bitmix.simulator.price`, a CostModel equal to `simulate()`) on the
default 16x16 NorthPole-style chip, with digits-cnn priced per frame over its zoo serving
batch of 256 frames (at batch 1 every layer is latency-bound and all-2-bit costs 0.98 of
all-4-bit; at batch 256 the cheapest assignment is 0.685). `--cores N` prices on an
N x N array instead. Protocol per assignment: fake-quantize
with 64 calibration images, fine-tune with LSQ (Adam, cosine, KD from the FP32 model)
and report test top-1, mean over seeds. `random` is the mean over draws (one seed each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from bitmix import zoo
from bitmix.compiler.allocate import Budget, allocate
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.compiler.sensitivity import METHODS, ProcessExecutor, ScoreContext, executor_for, score, strategy
from bitmix.compiler.sensitivity.eagl import VARIANTS, EAGLConfig, eagl_scores
from bitmix.ir.cost import CostModel
from bitmix.ir.targets import get_target
from bitmix.simulator import price
from bitmix.simulator.config import ChipConfig
from bitmix.study.config import DATA_LIMITS
from bitmix.study.drops import correlate, measure_drops, random_assignments
from bitmix.study.sweep import limit_data

KNAPSACK_METHODS = tuple(m for m in METHODS if strategy(m) == "knapsack")  # from the registry


def _qat_accuracy(job: tuple[tuple[tuple[str, int], ...], int], model, data, epochs: int, lr: float) -> float:
    assignment, seed = dict(job[0]), job[1]
    fq = fake_quantize(model, assignment, data.calibration(64))
    tuned = finetune(fq, data, epochs, lr, optimizer="adam", seed=seed, teacher=model)
    return data.evaluate(tuned)


class QAT:
    """Fine-tune-and-evaluate with a cache: many methods pick the same assignment."""

    def __init__(self, model, data, epochs: int, lr: float, workers: int) -> None:
        self.model, self.data, self.epochs, self.lr = model, data, epochs, lr
        self.cache: dict[tuple, float] = {}
        self.executor = ProcessExecutor(workers)

    def run(self, jobs: list[tuple[dict[str, int], int]]) -> list[float]:
        keys = [(tuple(sorted(a.items())), s) for a, s in jobs]
        todo = sorted({k for k in keys if k not in self.cache})
        model, data, epochs, lr = self.model, self.data, self.epochs, self.lr
        for key, acc in zip(
            todo, self.executor.map(lambda j: _qat_accuracy(j, model, data, epochs, lr), todo), strict=True
        ):
            self.cache[key] = acc
        return [self.cache[k] for k in keys]

    def mean(self, assignment: dict[str, int], seeds: list[int]) -> float:
        return statistics.mean(self.run([(assignment, s) for s in seeds]))


def dp_speed(layers: int = 60, repeats: int = 20) -> float:
    """Median DP solve time (ms) for a random 60-layer x 3-choice instance."""
    rng = np.random.default_rng(0)
    target = get_target("mixed-npu")
    names = tuple(f"l{i}" for i in range(layers))
    costs = CostModel.of_terms(names, [(8, 4, 2)] * layers, {
        "cycles": [[float(rng.uniform(1e3, 1e5)) * b / 8 + 50 for b in (8, 4, 2)] for _ in names],
        "energy_j": [[1e-6 * b for b in (8, 4, 2)] for _ in names],
        "sram_bytes": [[100 * b for b in (8, 4, 2)] for _ in names]})
    scores = {n: {8: 0.0, 4: float(rng.exponential()), 2: float(rng.exponential() * 3 + 1)} for n in names}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        allocate(scores, costs, target, names, Budget(fraction=0.7), solver="dp")
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------- EAGL ablation

ABLATION_STEPS = ("init", "mse", "learned")
STEP_LR_SCALES = (1.0, 10.0, 100.0)  # the steps' own learning rate while training at 4 bits, x the recipe's
SELECTION = ("digits-cnn", "digits-mlp")  # the default variant is chosen on these only


def _ablation_setup(study: str):
    """(zoo name, target, measurement fine-tune epochs, calibration size) of one ablation study.

    digits-mlp has a single free layer under int4int2-npu, so there it is ablated with the first and
    last layers free too (3 layers; rho over 1 layer is undefined). The measured drop fine-tunes one
    epoch (Adam 1e-4, as ALPS and the additivity check) where the study fine-tunes after allocation;
    the -ptq study and minilm (one epoch there costs ~40 s per layer) measure the drop without it.
    """
    from bitmix.ir.targets import Target

    name = study.removesuffix("-ptq")
    target = Target("int4int2-free", (4, 2)) if name == "digits-mlp" else get_target("int4int2-npu")
    epochs = 0 if study.endswith("-ptq") or name == "minilm" else 1
    return name, target, epochs, 32 if name == "minilm" else 64


def layer_drops(gm, names, target, data, epochs: int, seeds: int) -> dict[str, float]:
    """Measured test-loss increase of lowering one free layer to the lowest choice (mean over seeds)."""
    pinned = target.pinned(names)
    free = [n for n in names if n not in pinned]
    top = {n: target.highest for n in names} | pinned
    assignments = [top | {n: target.lowest} for n in free]
    runs = [measure_drops(gm, names, target, assignments, data, seed=s, finetune_epochs=epochs)
            for s in range(seeds if epochs else 1)]
    return {n: statistics.mean(r[i] for r in runs) for i, n in enumerate(free)}


def ablate(study: str, seeds: int) -> dict:
    """rho(step rule x variant) for one study, plus timings and the per-layer numbers behind them."""
    from scipy.stats import spearmanr

    from bitmix.compiler.pretrain import cached_train_at_highest
    from bitmix.compiler.sensitivity.eagl import entropies, variant_scores

    name, target, epochs, calib = _ablation_setup(study)
    model, example, data = zoo.load(name)
    data = limit_data(data, DATA_LIMITS.get(name))  # the study's own data: drops measured on the test set it scores
    graph = capture(model, example, name)
    gm = prepare(graph)
    names = graph.names
    start = time.perf_counter()
    drops = layer_drops(gm, names, target, data, epochs, seeds)
    measure_s = time.perf_counter() - start
    print(f"{study}: measured {len(drops)} layer drops in {measure_s:.0f} s", flush=True)
    ctx = ScoreContext(graph, target, gm, data, calibration=data.calibration(calib))
    free = list(ctx.free_layers)
    measured = [drops[n] for n in free]
    rules: dict[str, tuple[ScoreContext, str, float]] = {s: (ctx, s, 0.0) for s in ("init", "mse")}
    scales = STEP_LR_SCALES if study in SELECTION else (EAGLConfig().step_lr_scale,)
    for k in scales:
        pre = cached_train_at_highest(gm, names, target, data, step_lr=data.recipe.lr * k, seed=0)
        rules[f"learned(step lr x{k:g})"] = (replace(ctx, pretrained=pre.model), "learned", pre.seconds)
        print(f"{study}: trained at {target.highest} bits (step lr x{k:g}) in {pre.seconds:.0f} s", flush=True)
    out: dict = {"free": free, "measured": drops, "measure_s": measure_s, "finetune_epochs": epochs,
                 "target": target.name, "rules": {}}
    params = [graph.layer(n).weight_elements for n in free]
    out["rho_params_alone"] = float(spearmanr(params, measured)[0])
    for label, (rctx, steps, pretrain_s) in rules.items():
        t0 = time.perf_counter()
        h = entropies(rctx, EAGLConfig(steps=steps))
        score_s = time.perf_counter() - t0
        rhos = {}
        for variant in VARIANTS:
            s = variant_scores(rctx, h, variant)
            rhos[variant] = float(spearmanr([s[n][target.lowest] for n in free], measured)[0])
        entropy = {n: {str(b): v for b, v in hl.items()} for n, hl in h.items()}  # JSON keys are strings
        out["rules"][label] = {"rho": rhos, "entropy": entropy, "score_s": score_s, "pretrain_s": pretrain_s}
    return out


def run_ablation(studies: list[str], seeds: int, json_path: str | None) -> dict:
    os.environ.setdefault("BITMIX_QUIET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    results = {}
    for study in studies:
        res = ablate(study, seeds)
        results[study] = res
        print(f"\n== {study}: Spearman rho(score at the lowest choice, measured test-loss increase), "
              f"{len(res['free'])} layers, target {res['target']}, drop fine-tune {res['finetune_epochs']} epoch(s) ==")
        print("measured: " + ", ".join(f"{n} {v:+.4f}" for n, v in res["measured"].items()))
        print(f"parameter count alone: rho {res['rho_params_alone']:+.3f}")
        print(f"{'variant':22s}" + "".join(f"{label:>26s}" for label in res["rules"]))
        for variant in VARIANTS:
            print(f"{variant:22s}" + "".join(f"{r['rho'][variant]:+26.3f}" for r in res["rules"].values()))
        print(f"{'score s / pretrain s':22s}" + "".join(f"{r['score_s']:>17.3f} / {r['pretrain_s']:6.1f}"
                                                      for r in res["rules"].values()))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 random draws, short fine-tunes")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.85])
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--additivity", type=int, default=16, help="random assignments for the rho check")
    parser.add_argument("--json", default=None)
    parser.add_argument("--ablation", nargs="+", default=None, metavar="MODEL",
                        help="only the EAGL ablation on these studies (digits-cnn, digits-mlp, digits-cnn-ptq, minilm)")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="fine-tune seeds per measured layer drop")
    args = parser.parse_args()
    if args.ablation:
        run_ablation(args.ablation, args.ablation_seeds, args.json)
        return
    if args.quick:
        args.seeds, args.draws, args.epochs, args.additivity = 1, 3, 1, 8
    os.environ.setdefault("BITMIX_QUIET", "1")
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    out: dict = {"config": vars(args)}

    model, example, data = zoo.load("digits-cnn")
    graph = capture(model, example, "digits-cnn")
    gm = prepare(graph)
    target = get_target("int4int2-npu")
    chip = replace(ChipConfig(), cores_x=args.cores, cores_y=args.cores)
    costs = price(graph, target, chip)
    names = graph.names
    ctx = ScoreContext(graph, target, gm, data, executor=executor_for(args.workers))

    print(f"DP, 60 layers x 3 choices: {dp_speed():.2f} ms (median of 20)")
    out["dp_ms"] = dp_speed()

    print("\n== method wall time (digits-cnn, int4int2-npu) ==")
    scores, walls = {}, {}
    for method in sorted(METHODS):
        start = time.perf_counter()
        scores[method] = score(method, ctx)
        walls[method] = time.perf_counter() - start
        print(f"{method:8s} {walls[method]:8.3f} s")
    out["wall_s"] = walls
    out["scores"] = scores

    qat = QAT(gm, data, args.epochs, args.lr, args.workers)
    all4 = {n: 4 for n in names} | target.pinned(names)
    all4_acc = qat.mean(all4, seeds)
    print(f"\nall-4-bit (first/last 8) after QAT: {all4_acc:.2f} %   FP32: {data.evaluate(gm):.2f} %")
    out["all4_acc"] = all4_acc

    print("\n== EAGL ablation: QAT top-1 at each budget; Spearman rho vs ALPS scores ==")
    from scipy.stats import spearmanr

    alps_vec = [scores["alps"][n][2] for n in ctx.free_layers]
    ablation = {}
    for variant in VARIANTS:
        s = eagl_scores(ctx, EAGLConfig(variant=variant))
        rho = float(spearmanr([s[n][2] for n in ctx.free_layers], alps_vec)[0])
        accs = {}
        for b in args.budgets:
            a = allocate(s, costs, target, names, Budget(fraction=b)).assignment
            accs[b] = qat.mean(a, seeds)
        ablation[variant] = {"rho_vs_alps": rho, "acc": accs, "mean_acc": statistics.mean(accs.values())}
        print(f"{variant:20s} rho={rho:+.3f}  " + "  ".join(f"{b}: {accs[b]:.2f}" for b in args.budgets))
    out["eagl_ablation"] = ablation

    print(f"\n== QAT top-1 (%) by budget (fraction of all-4-bit cycles, {args.cores}x{args.cores} chip) ==")
    results: dict = {}
    for b in args.budgets:
        row = {}
        for method in (*KNAPSACK_METHODS, "uniform"):
            alloc = allocate(scores[method], costs, target, names, Budget(fraction=b), strategy=strategy(method))
            row[method] = {
                "acc": qat.mean(alloc.assignment, seeds),
                "assignment": alloc.assignment,
                "fraction": alloc.fraction,
            }
        draws = [
            allocate(scores["random"], costs, target, names, Budget(fraction=b), strategy="random", seed=d)
            for d in range(args.draws)
        ]
        accs = qat.run([(d.assignment, i % args.seeds) for i, d in enumerate(draws)])
        row["random"] = {"acc": statistics.mean(accs), "draws": accs}
        results[b] = row
        print(f"budget {b}: all-4 {all4_acc:.2f} | " + " | ".join(f"{m} {row[m]['acc']:.2f}" for m in row))
        for method in KNAPSACK_METHODS:
            low = [n for n, bits in row[method]["assignment"].items() if bits == 2]
            print(f"    {method:6s} fraction {row[method]['fraction']:.3f} 2-bit: {', '.join(low)}")
    out["results"] = results

    print("\n== additivity: Spearman rho of summed scores vs measured test-loss increase (1-epoch QAT) ==")
    out["additivity"] = {}
    free = ctx.free_layers
    for label, lowered in (("k=1..all lowered", None), (f"k={len(free) // 2} lowered", len(free) // 2)):
        assignments = random_assignments(names, target, args.additivity, 0, lowered)
        measured = measure_drops(gm, names, target, assignments, data, finetune_epochs=1)
        for method in KNAPSACK_METHODS:
            res = correlate(scores[method], assignments, measured)
            out["additivity"][f"{method} {label}"] = {"rho": res.rho, "p": res.pvalue}
            print(f"{label:18s} {method:6s} rho={res.rho:+.3f} (p={res.pvalue:.3f}, n={args.additivity})")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
