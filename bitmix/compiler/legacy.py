"""The 0.1 spellings of `compile` keywords, kept for one release with a DeprecationWarning.

calibration= / eval= (with data=) → `data=Data(calibration=, train=, eval=)`;
fps= / latency_s= / energy_j= / clamp_budget= → `budget=Budget(...)`; method_options= (flat
`alps_epochs`, `hawq_samples`, `workers` ...) → `method=ALPSConfig(...)` and an executor;
chip_config= → `target=bitmix.targets[...].with_chip_config(path)`; name= / frontier_points=
→ `options=CompileOptions(...)`. Delete this file in the release after next.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from bitmix.budget import DEFAULT_FRACTION, Budget
from bitmix.compiler.inputs import CompileOptions
from bitmix.compiler.sensitivity import METHODS, MethodConfig, executor_for, resolve
from bitmix.errors import BitmixError
from bitmix.ir.targets import Target, get_target
from bitmix.task import Data, TaskData

KEYWORDS = ("calibration", "eval", "fps", "latency_s", "energy_j", "clamp_budget", "method_options", "chip_config",
            "name", "frontier_points")


def translate(method: str | MethodConfig, budget: Any, data: Any, target: str | Target, options: CompileOptions,
              old: dict[str, Any]) -> tuple[str | MethodConfig, Any, Any, str | Target, CompileOptions]:
    """The new-style arguments equivalent to a call that used old keywords (which are consumed)."""
    unknown = sorted(set(old) - set(KEYWORDS))
    if unknown:
        raise BitmixError(f"compile() got an unexpected keyword {unknown[0]!r}; see help(bitmix.compile)")
    warnings.warn(f"bitmix.compile: {', '.join(f'{k}=' for k in old)} are deprecated and go in the next release; "
                  "use data=Data(...), budget=Budget(...), method=<Method>Config(...), options=CompileOptions(...)",
                  DeprecationWarning, stacklevel=4)  # this, `pipeline._compile`, `compile`, the caller
    if "calibration" in old or "eval" in old:
        calibration, evaluator = old.get("calibration"), old.get("eval")
        train = next((d for d in (data, calibration, evaluator) if isinstance(d, TaskData)), None)
        data = Data(calibration=calibration if calibration is not None else data, train=train, eval=evaluator)
    goals = {k: old[k] for k in ("fps", "latency_s", "energy_j") if old.get(k) is not None}
    if goals:
        budget = Budget(**goals)
    if old.get("clamp_budget"):
        budget = dataclasses.replace(Budget.of(budget if budget is not None else DEFAULT_FRACTION), clamp=True)
    if old.get("method_options"):
        method, executor = _method_config(method, dict(old["method_options"]))
        if executor is not None:
            options = dataclasses.replace(options, executor=executor)
    if old.get("chip_config"):
        target = get_target(target, old["chip_config"])
    for key in ("name", "frontier_points"):
        if key in old:
            options = dataclasses.replace(options, **{key: old[key]})
    return method, budget, data, target, options


def _method_config(method: str | MethodConfig, flat: dict[str, Any]) -> tuple[MethodConfig, Any]:
    """Old flat options (`alps_epochs=`, `batch_size=`, `workers=` ...) → the method's config and an executor."""
    m, config = resolve(method)
    workers = flat.pop("workers", None)
    executor = flat.pop("executor", None) or (executor_for(int(workers)) if workers else None)
    fields = {f.name for f in dataclasses.fields(config)}
    prefixes = tuple(f"{name}_" for name in METHODS)
    changes = {}
    for key, value in flat.items():
        field = key.removeprefix(f"{m.name}_")
        if key == "eagl_variant" and m.name == "eagl":
            field = "variant"
        if field in fields:
            changes[field] = value
        elif not key.startswith(prefixes) and key not in ("calibration_size", "batch_size"):
            raise BitmixError(f"unknown method option {key!r} for {m.name!r}; "
                              f"{type(config).__name__} has: {', '.join(sorted(fields)) or 'no options'}")
    return dataclasses.replace(config, **changes), executor
