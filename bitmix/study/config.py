"""What one frontier study sweeps and how: the methods (from the sensitivity registry), budgets,
seeds, the fine-tuning recipe and each method's options per zoo model; `fingerprint()` tags cached results."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bitmix.compiler import sensitivity
from bitmix.compiler.sensitivity import MethodConfig
from bitmix.errors import BitmixError
from bitmix.task import FinetuneConfig
from bitmix.zoo import digits, minilm

PROPOSED = ("eagl", "alps")  # the seed paper's methods, compared against every other registered one
BUDGETS = (0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
# Where the simulator makes most of BUDGETS infeasible (digits-mlp: cheapest = 0.92 of all-4; minilm: 0.91),
# a few feasible budgets are added so the study still has mixed-precision points; the others stay infeasible.
EXTRA_BUDGETS = {"digits-mlp": (0.95,), "minilm": (0.925, 0.95, 0.975)}
QUICK_BUDGETS = (0.8, 1.0)
QUICK_METHODS = ("eagl", "uniform")
GREEDY_SUFFIX = "@pareto-greedy"  # points of a knapsack method's scores allocated by AIMET AMP's search
REFERENCE_BITS = (8, 4, 2)
TARGET = "int4int2-npu"
COSTS = "exact"  # budgets on the simulator's exact costs (`simulator.price` equals `simulate()`; issue 11)
# Study names: zoo models, plus "<model>-ptq" = the same sweep with no fine-tuning after allocation
# (post-training quantization only), a harder regime where layer choices matter more.
MODELS = ("digits-cnn", "digits-mlp", "minilm", "digits-cnn-ptq")

Log = Callable[[str], None]


@dataclass(frozen=True)
class StudyConfig:
    """What to sweep on one model and how; `fingerprint()` tags cached results."""

    model: str
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: int
    recipe: FinetuneConfig
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)  # {method: config fields}
    calibration_size: int = 64  # unlabeled training inputs the post-training scorers (eagl, sqnr) see
    additivity: int = 16  # random assignments for the additivity check (0 = skip)
    additivity_epochs: int = 1  # fine-tune per assignment there, as ALPS does per layer
    workers: int = 2
    quick: bool = False
    check_fake_quant: bool = True  # also evaluate the fake-quant model (bit-exact with the kernels; costly on minilm)
    name: str = ""  # the study's name and output folder when it differs from the zoo model (e.g. digits-cnn-ptq)

    @property
    def label(self) -> str:
        return self.name or self.model

    def fingerprint(self) -> str:
        """Hash of everything that changes a measured number (not the sweep ranges or workers)."""
        methods = {m: asdict(sensitivity.resolve(self.method(m))[1]) for m in sorted(sensitivity.METHODS)}
        key = json.dumps({"model": self.model, "recipe": asdict(self.recipe), "options": self.method_options,
                          "methods": methods, "calibration_size": self.calibration_size, "target": TARGET,
                          "costs": COSTS}, sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:12]

    def method(self, name: str) -> str | MethodConfig:
        """What to score with: the method's config carrying this study's options for it, else its name."""
        options = self.method_options.get(name)
        return replace(sensitivity.METHODS[name].config(), **options) if options else name


def default_config(
    model: str,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] | None = None,
    seeds: int | None = None,
    quick: bool = False,
    workers: int = 2,
) -> StudyConfig:
    """The study's fixed recipe per model; `quick` = one seed, two budgets, two methods, one epoch."""
    if model not in MODELS:
        raise BitmixError(f"the frontier study needs a zoo model with data; choose from {', '.join(MODELS)}")
    name, ptq = model, model.endswith("-ptq")
    model = model.removesuffix("-ptq")
    calibration_size = 64
    if model.startswith("digits"):
        recipe, n_seeds, additivity = digits.RECIPE, 5, 16
        options: dict[str, dict[str, Any]] = {"alps": {"epochs": 1.0}}
        add_epochs, check = 1, True
    else:  # minilm: data.loss is 1 - cosine to the FP32 embeddings, i.e. distillation from FP32
        # one forward pass over the data costs ~10 s here, so the data-driven scorers get smaller settings
        recipe, n_seeds, additivity, add_epochs, check = minilm.RECIPE, 3, 6, 0, False
        small = {"calibration_size": 32, "batch_size": minilm.RECIPE.batch_size}
        options = {"alps": {"epochs": 0.25, **small}, "limpq": {"epochs": 1, **small},
                   "hawq": {"samples": 8, "examples": 64}}
        calibration_size = 32
    recipe = replace(recipe, epochs=0 if ptq else 1 if quick else recipe.epochs)
    add_epochs = 0 if ptq else add_epochs
    if quick:
        methods, budgets, n_seeds, additivity = methods or QUICK_METHODS, budgets or QUICK_BUDGETS, 1, 4
    unknown = sorted(set(methods or ()) - set(all_methods()))
    if unknown:
        raise BitmixError(f"unknown method {unknown[0]!r}; choose from {', '.join(all_methods())}")
    if budgets is not None and any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise BitmixError(f"budgets must be positive fractions of the all-4-bit cost, got {list(budgets)}")
    n_seeds = seeds if seeds is not None and not quick else n_seeds
    if n_seeds < 1:
        raise BitmixError(f"--seeds must be >= 1, got {n_seeds}")
    budgets = budgets or BUDGETS + EXTRA_BUDGETS.get(model, ())
    return StudyConfig(model, tuple(methods or all_methods()), tuple(sorted(budgets)), n_seeds, recipe,
                       options, calibration_size, additivity, 0 if quick else add_epochs, max(1, workers), quick,
                       check, name if name != model else "")


def all_methods() -> tuple[str, ...]:
    """Every registered method: the proposed ones, then the other knapsack methods, then the baselines."""
    methods = sensitivity.METHODS.values()
    knapsack = [m.name for m in methods if m.strategy == "knapsack" and m.name not in PROPOSED]
    baselines = [m.name for m in methods if m.strategy != "knapsack" and m.name not in PROPOSED]
    return tuple(m for m in PROPOSED if m in sensitivity.METHODS) + tuple(knapsack + baselines)
