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
from bitmix.compiler.inputs import CALIBRATION_SAMPLES
from bitmix.compiler.sensitivity import MethodConfig
from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.targets import Target
from bitmix.task import FinetuneConfig
from bitmix.zoo import digits, minilm

PROPOSED = ("eagl", "alps")  # the seed paper's methods, compared against every other registered one
BUDGETS = (0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
# Where the simulator makes most of BUDGETS infeasible (digits-mlp: cheapest = 0.92 of all-4; minilm: 0.91),
# a few feasible budgets are added so the study still has mixed-precision points; the others stay infeasible.
EXTRA_BUDGETS = {"digits-mlp": (0.95,), "minilm": (0.925, 0.95, 0.975)}
# Feasible budgets per (model, target) where the defaults miss them (`cheapest_fraction` of the simulated
# costs): minilm at int4int2-npu 0.8125 (0.830 before 4-bit per-row activation steps, 0.894 before the rotation);
# w4a8-npu lowers weights only (activations stay 8 bits), so its
# cheapest assignment is 0.961 of all-4/8 on digits-cnn, 0.997 on minilm (at batch 1 x 64 tokens mostly
# activation traffic) and 1.0 on digits-mlp (no mix at all).
# w4a8r-npu on minilm: all-2/8r is 0.83 of all-4/8r (12.88 vs 15.52 us simulated, docs/quality.md).
TARGET_BUDGETS = {("minilm", "int4int2-npu"): (0.85, 0.9, 0.925, 0.95, 0.975, 1.0),
                  ("minilm", "w4a8r-npu"): (0.85, 0.9, 0.925, 0.95, 0.975, 1.0),
                  ("minilm", "w4a8-npu"): (0.9975, 0.998, 0.9985, 0.999, 0.9995, 1.0),
                  ("digits-cnn", "w4a8-npu"): (0.965, 0.97, 0.98, 0.99, 1.0)}
QUICK_BUDGETS = (0.8, 1.0)
QUICK_METHODS = ("eagl", "uniform")
GREEDY_SUFFIX = "@pareto-greedy"  # points of a knapsack method's scores allocated by AIMET AMP's search
TARGET = "int4int2-npu"  # the default; a study name ending in a key of TARGET_SUFFIXES picks another
TARGET_SUFFIXES = {"-w4a8": "w4a8-npu", "-w4a8r": "w4a8r-npu"}
COSTS = "exact"  # budgets on the simulator's exact costs (`simulator.price` equals `simulate()`; issue 11)
# Study names: zoo models, plus "<model>-ptq" = the same sweep with no fine-tuning after allocation
# (post-training quantization only), a harder regime where layer choices matter more, and "...-w4a8" =
# the same at target w4a8-npu (4- or 2-bit weights, 8-bit activations), "...-w4a8r" at w4a8r-npu (the same with
# each linear's input rotated; transformers only: the rule rotates no conv). `all` runs MODELS; minilm runs
# in the PTQ regime there (its fine-tuned sweep, "minilm", stays available: ~17 min per training on 2 cores).
MODELS = ("digits-cnn", "digits-mlp", "digits-cnn-ptq", "minilm-ptq",
          "digits-cnn-w4a8", "digits-cnn-ptq-w4a8", "minilm-ptq-w4a8")
OTHER_STUDIES = ("minilm", "digits-mlp-ptq", "digits-mlp-w4a8", "minilm-w4a8", "minilm-ptq-w4a8r", "minilm-w4a8r")
# minilm evaluates on an evenly spaced subset of its test sentences (and trains / calibrates on a subset of
# its training sentences): one pass over all 542 test sentences takes ~100 s on one loaded core.
DATA_LIMITS = {"minilm": (320, 160)}  # (train, test) examples

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
    target: str = TARGET
    data_limits: tuple[int, int] | None = None  # (train, test) examples kept, evenly spaced; None = all
    shared_pretrain: bool = False  # one training at the highest choice (seed 0) for every seed's scoring
    method_seeds: dict[str, int] = field(default_factory=dict, hash=False)  # {method: fewer seeds than `seeds`}
    point_calibration: int = CALIBRATION_SAMPLES  # inputs that set a measured point's activation steps

    def seeds_of(self, method: str) -> int:
        return min(self.seeds, self.method_seeds.get(method, self.seeds))

    @property
    def label(self) -> str:
        return self.name or self.model

    def fingerprint(self, scores_only: bool = False) -> str:
        """Hash of everything that changes a measured number (not the sweep ranges or workers). With
        `scores_only`, of what changes the scores: not the recipe after allocation nor the points'
        calibration (scoring trains with the task's own recipe), so a model's -ptq study and a new
        measurement protocol score alike."""
        methods = {m: asdict(sensitivity.resolve(self.method(m))[1]) for m in sorted(sensitivity.METHODS)}
        fields: dict[str, Any] = {"model": self.model, "options": self.method_options, "methods": methods,
                                  "calibration_size": self.calibration_size, "target": self.target, "costs": COSTS}
        fields |= {"data_limits": self.data_limits} if self.data_limits else {}
        fields |= {"shared_pretrain": True} if self.shared_pretrain else {}
        if not scores_only:
            fields["recipe"] = asdict(self.recipe)
            if self.point_calibration != CALIBRATION_SAMPLES:
                fields["point_calibration"] = self.point_calibration
        key = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:12]

    def method(self, name: str) -> str | MethodConfig:
        """What to score with: the method's config carrying this study's options for it, else its name."""
        options = self.method_options.get(name)
        return replace(sensitivity.METHODS[name].config(), **options) if options else name


def parse_study(name: str) -> tuple[str, bool, str]:
    """A study name -> (zoo model, PTQ regime, target): "<model>[-ptq][-w4a8|-w4a8r]"."""
    if name not in MODELS + OTHER_STUDIES:
        raise BitmixError(f"the frontier study needs a zoo model with data; choose from {', '.join(MODELS)}, "
                          f"{', '.join(OTHER_STUDIES)}")
    target = TARGET
    for suffix, named in TARGET_SUFFIXES.items():
        if name.endswith(suffix):
            name, target = name.removesuffix(suffix), named
    return name.removesuffix("-ptq"), name.endswith("-ptq"), target


def references(target: Target) -> tuple[tuple[str, Precision], ...]:
    """Uniform reference assignments: all-8 (every layer at 8/8) and every free choice of the target,
    labelled "all-4" for 4/4 and "all-4/8" for a pair."""
    choices = dict.fromkeys((Precision(8, 8), *(as_precision(c) for c in target.choices)))
    return tuple((f"all-{c.w}" if c == c.w else f"all-{c}", c) for c in choices)


def default_config(
    model: str,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] | None = None,
    seeds: int | None = None,
    quick: bool = False,
    workers: int = 2,
    additivity: int | None = None,
    method_seeds: dict[str, int] | None = None,
) -> StudyConfig:
    """The study's fixed recipe per model; `quick` = one seed, two budgets, two methods, one fine-tune epoch
    (none for -ptq studies)."""
    name = model
    model, ptq, target = parse_study(name)
    calibration_size, limits, shared, point_calibration = 64, DATA_LIMITS.get(model), False, CALIBRATION_SAMPLES
    default_methods = all_methods()
    if model.startswith("digits"):
        recipe, n_seeds, n_additivity = digits.RECIPE, 5, 16
        options: dict[str, dict[str, Any]] = {"alps": {"epochs": 1.0}}
        add_epochs, check = 1, True
    else:  # minilm: data.loss is 1 - cosine to the FP32 embeddings, i.e. distillation from FP32
        # a forward pass over its data is costly on 2 cores, so the data-driven scorers get smaller settings
        # (ALPS: 2 batches of 16 per lowered layer); LIMPQ (a multi-bit LSQ training) is not in the default set;
        # EAGL's training at the highest choice (1023 s per seed on the full data at load ~20, docs/eagl.md)
        # is done once and shared by every seed
        # and each point calibrates its activation steps (MSE search, smoothing, bias correction) on 32 inputs
        shared, point_calibration = True, 32
        recipe, n_seeds, n_additivity, add_epochs, check = minilm.RECIPE, 5, 6, 0, False
        small = {"calibration_size": 32, "batch_size": 16}
        options = {"alps": {"epochs": 0.1, **small}, "limpq": {"epochs": 1, **small},
                   "hawq": {"samples": 8, "examples": 64}}
        calibration_size = 32
        default_methods = tuple(m for m in default_methods if m != "limpq")
    recipe = replace(recipe, epochs=0 if ptq else 1 if quick else recipe.epochs)
    add_epochs = 0 if ptq else add_epochs
    if quick:
        methods, budgets, n_seeds, n_additivity = methods or QUICK_METHODS, budgets or QUICK_BUDGETS, 1, 4
    unknown = sorted(set(methods or ()) - set(all_methods()))
    if unknown:
        raise BitmixError(f"unknown method {unknown[0]!r}; choose from {', '.join(all_methods())}")
    if budgets is not None and any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise BitmixError(f"budgets must be positive fractions of the all-4-bit cost, got {list(budgets)}")
    n_seeds = seeds if seeds is not None and not quick else n_seeds
    if additivity is not None:
        if additivity < 0:
            raise BitmixError(f"--additivity must be >= 0 (0 = skip the check), got {additivity}")
        n_additivity = additivity
    if seeds is not None and seeds < 1:  # the value given, even where quick replaces it
        raise BitmixError(f"--seeds must be >= 1, got {seeds}")
    if workers < 1:
        raise BitmixError(f"--workers must be >= 1, got {workers}")
    for method, n in (method_seeds or {}).items():
        if method not in all_methods() or n < 1:
            raise BitmixError(f"--method-seeds needs METHOD=N with a known method and N >= 1, got {method}={n}")
    budgets = budgets or TARGET_BUDGETS.get((model, target), BUDGETS + EXTRA_BUDGETS.get(model, ()))
    return StudyConfig(model, tuple(methods or default_methods), tuple(sorted(budgets)), n_seeds, recipe,
                       options, calibration_size, n_additivity, 0 if quick else add_epochs, workers, quick,
                       check, name if name != model else "", target, limits, shared, dict(method_seeds or {}),
                       point_calibration)


def all_methods() -> tuple[str, ...]:
    """Every registered method: the proposed ones, then the other knapsack methods, then the baselines."""
    methods = sensitivity.METHODS.values()
    knapsack = [m.name for m in methods if m.strategy == "knapsack" and m.name not in PROPOSED]
    baselines = [m.name for m in methods if m.strategy != "knapsack" and m.name not in PROPOSED]
    return tuple(m for m in PROPOSED if m in sensitivity.METHODS) + tuple(knapsack + baselines)
