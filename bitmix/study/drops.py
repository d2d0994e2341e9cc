"""Additivity check: do summed per-layer scores rank the measured quality drop of mixed assignments?

The knapsack assumes a mixed assignment loses Σ_l score_l(b_l). For `n` random
assignments (the number of lowered layers spread evenly from 1 to all), this compares
that sum with the measured drop against the all-highest model treated identically
(fake-quantized with calibration, optionally fine-tuned `finetune_epochs`), and reports
Spearman's ρ with its two-sided p (exact over all pairings for small `n`, where the
t-approximation is far too small, e.g. 0 for a perfect ranking of 4). The measure is the
task loss on the test split (`metric="loss"`) or the task metric drop in percentage points
(`"quality"`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from scipy.stats import permutation_test, rankdata, spearmanr
from torch import nn

from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.compiler.sensitivity.alps import quality_drop_measure
from bitmix.compiler.sensitivity.base import Scores
from bitmix.errors import BitmixError
from bitmix.ir.targets import Target
from bitmix.task import TaskData

EXACT_MAX_N = 8  # 8! = 40320 pairings: enumerated in well under a second; above, the t-approximation is used


@dataclass(frozen=True)
class AdditivityResult:
    rho: float
    pvalue: float
    predicted: tuple[float, ...]
    measured: tuple[float, ...]
    assignments: tuple[dict[str, int], ...]


def random_assignments(
    layer_names: tuple[str, ...], target: Target, n: int, seed: int, lowered: int | None = None
) -> list[dict[str, int]]:
    """`n` assignments lowering k = 1..all free layers (k spread evenly), pinned layers fixed.

    With `lowered` set every assignment lowers exactly that many layers: a harder test,
    since ρ can no longer come from the number of lowered layers alone.
    """
    pinned = target.pinned(layer_names)
    free = [name for name in layer_names if name not in pinned]
    if not free or len(target.choices) < 2:
        raise BitmixError("additivity needs at least one free layer and two precision choices")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = lowered if lowered is not None else (1 + (i * len(free)) // n if n > 1 else len(free))
        chosen = set(rng.sample(free, min(k, len(free))))
        assignment = {name: (rng.choice(target.choices[1:]) if name in chosen else target.highest) for name in free}
        out.append(assignment | pinned)
    return out


def measure_drops(
    model: nn.Module,
    layer_names: tuple[str, ...],
    target: Target,
    assignments: list[dict[str, int]],
    data: TaskData,
    seed: int = 0,
    finetune_epochs: int = 0,
    lr: float = 1e-4,
    metric: str = "loss",
    reference: float | None = None,
) -> list[float]:
    """Measured drop of each assignment against all-highest, both treated identically. `reference`: the
    all-highest measure when the caller has it already (`highest_quality` with the same arguments)."""
    if reference is None:
        reference = highest_quality(model, layer_names, target, data, seed, finetune_epochs, lr, metric)
    return [_quality(model, a, data, seed, finetune_epochs, lr, metric) - reference for a in assignments]


def highest_quality(model: nn.Module, layer_names: tuple[str, ...], target: Target, data: TaskData, seed: int = 0,
                    finetune_epochs: int = 0, lr: float = 1e-4, metric: str = "loss") -> float:
    """The all-highest assignment's measure, which every drop of `measure_drops` is taken against."""
    highest = {name: target.highest for name in layer_names} | target.pinned(layer_names)
    return _quality(model, highest, data, seed, finetune_epochs, lr, metric)


def _quality(model: nn.Module, assignment: dict[str, int], data: TaskData, seed: int, finetune_epochs: int,
             lr: float, metric: str) -> float:
    """Lower-is-better measure of `assignment` fake-quantized on 64 calibration inputs, optionally fine-tuned."""
    fq = fake_quantize(model, assignment, data.calibration(64), share_float_passes=True)
    if finetune_epochs:
        fq = finetune(fq, data, finetune_epochs, lr, optimizer="adam", seed=seed)
    return float(quality_drop_measure(metric)(fq, data, "test"))


def correlate(scores: Scores, assignments: list[dict[str, int]], measured: list[float]) -> AdditivityResult:
    """Spearman ρ between Σ scores per assignment and the measured drops."""
    predicted = [sum(scores[name][bits] for name, bits in a.items() if name in scores) for a in assignments]
    if len(set(predicted)) < 2 or len(set(measured)) < 2:  # no ranking to compare: rho is undefined (n/a)
        return AdditivityResult(math.nan, math.nan, tuple(predicted), tuple(measured), tuple(assignments))
    rho, pvalue = spearmanr(predicted, measured)
    if len(predicted) <= EXACT_MAX_N:
        pvalue = exact_spearman_pvalue(predicted, measured)
    return AdditivityResult(float(rho), float(pvalue), tuple(predicted), tuple(measured), tuple(assignments))


def exact_spearman_pvalue(x: list[float], y: list[float]) -> float:
    """Two-sided p of Spearman's ρ over all n! pairings of the ranks (ties get average ranks)."""
    ry = rankdata(y)
    ry = ry - ry.mean()

    def rho(rx: np.ndarray, axis: int = -1) -> np.ndarray:
        rx = rx - rx.mean(axis=axis, keepdims=True)
        return (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum())

    result = permutation_test((rankdata(x),), rho, permutation_type="pairings", vectorized=True,
                              n_resamples=math.inf, alternative="two-sided")
    return float(result.pvalue)


def check_additivity(
    model: nn.Module,
    layer_names: tuple[str, ...],
    target: Target,
    scores: Scores,
    data: TaskData,
    n: int = 20,
    seed: int = 0,
    finetune_epochs: int = 0,
    lr: float = 1e-4,
    metric: str = "loss",
    lowered: int | None = None,
) -> AdditivityResult:
    """Spearman ρ between Σ scores and the measured drop over `n` random assignments."""
    assignments = random_assignments(tuple(layer_names), target, n, seed, lowered)
    measured = measure_drops(model, tuple(layer_names), target, assignments, data, seed, finetune_epochs, lr, metric)
    return correlate(scores, assignments, measured)
