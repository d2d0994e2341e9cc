"""Additivity check: measured loss increase of random 2-bit subsets vs each knapsack method's summed scores."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torch import nn

from bitmix.compiler import sensitivity
from bitmix.compiler.sensitivity import ALPSConfig
from bitmix.ir.precision import as_precision, format_assignment
from bitmix.study.config import Log, StudyConfig
from bitmix.study.store import read_assignment


def additivity(config: StudyConfig, out: Path, fp: str, prepared: nn.Module, names: tuple[str, ...], target: Any,
                data: Any, scored: dict, say: Log) -> dict:
    """Measured loss increase of random 2-bit subsets vs each knapsack method's summed seed-0 scores.

    Two sets of `config.additivity` subsets: "spread" lowers 1..all free layers (ρ there is helped by the
    count of lowered layers alone), "fixed" lowers exactly half of them (only the choice of layers varies).
    """
    from bitmix.study.drops import correlate, highest_quality, measure_drops, random_assignments

    methods = [m for m in config.methods if sensitivity.strategy(m) == "knapsack"]
    if config.additivity < 2 or not methods:
        return {}
    free = len([n for n in names if n not in target.pinned(names)])
    path = out / "additivity.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if (cached.get("recipe"), cached.get("n"), cached.get("finetune_epochs")) != (
            fp, config.additivity, config.additivity_epochs) or "sets" not in cached:
        lr = ALPSConfig(**config.method_options.get("alps", {})).lr  # fine-tuned as ALPS tunes its jobs
        cached = {"recipe": fp, "n": config.additivity, "finetune_epochs": config.additivity_epochs, "lr": lr,
                  "metric": "test loss increase vs all-4-bit", "sets": {}}
        options = {"seed": 0, "finetune_epochs": config.additivity_epochs, "lr": lr, "metric": "loss"}
        reference: float | None = None  # the all-highest measure, taken once for both sets
        for name, lowered in (("spread", None), ("fixed", max(1, free // 2))):
            start = time.perf_counter()
            assignments = random_assignments(tuple(names), target, config.additivity, seed=0, lowered=lowered)
            if reference is None:
                reference = highest_quality(prepared, tuple(names), target, data, **options)
            measured = measure_drops(prepared, tuple(names), target, assignments, data, reference=reference,
                                     **options)
            cached["sets"][name] = {"lowered": lowered, "assignments": [format_assignment(a) for a in assignments],
                                    "measured": measured,
                                    "seconds": time.perf_counter() - start}
            say(f"  additivity ({name}): {config.additivity} random assignments measured in "
                f"{cached['sets'][name]['seconds']:.0f} s")
        path.write_text(json.dumps(cached))
    sets = {}
    for name, entry in cached["sets"].items():
        per_method = {}
        for method in methods:
            assignments = [read_assignment(a) for a in entry["assignments"]]
            r = correlate(scored[(method, 0)]["scores"], assignments, entry["measured"])
            per_method[method] = {"rho": _finite(r.rho), "pvalue": _finite(r.pvalue), "predicted": list(r.predicted)}
        lowered = [sum(1 for b in a.values() if as_precision(b) == target.lowest) for a in entry["assignments"]]
        sets[name] = {"measured": entry["measured"], "seconds": entry["seconds"], "methods": per_method,
                      "lowered_layers": lowered}
    return {k: cached[k] for k in ("n", "finetune_epochs", "lr", "metric")} | {"free_layers": free, "sets": sets}


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
