"""Per-layer sensitivity methods behind one registry: `score(method, ctx) -> Scores`.

One file per method, each with its own frozen config and registering itself with
`@register(name, config=..., needs_data=...)`: eagl (data-free entropy), alps (one-epoch
fine-tune per layer), hawq (Hessian trace), limpq (learned per-bit steps), sqnr
(label-free output SQNR), and the allocation baselines uniform / random (zero scores;
`strategy(method)` names the allocator). `method` is a name or a config instance.

Every module of this package is imported here, so a new method file registers itself by being
here; a method defined elsewhere registers when its module is imported.
"""

import importlib
import pkgutil

from bitmix.compiler.sensitivity.alps import ALPSConfig
from bitmix.compiler.sensitivity.base import (
    METHODS,
    Method,
    MethodConfig,
    ScoreContext,
    Scores,
    check_inputs,
    data_free,
    label_free,
    register,
    relative_to_highest,
    resolve,
    score,
    seeded,
    strategy,
)
from bitmix.compiler.sensitivity.eagl import EAGLConfig
from bitmix.compiler.sensitivity.executor import (
    Executor,
    ProcessExecutor,
    SerialExecutor,
    executor_for,
)
from bitmix.compiler.sensitivity.hawq import HAWQConfig
from bitmix.compiler.sensitivity.launch import open_executor
from bitmix.compiler.sensitivity.limpq import LIMPQConfig
from bitmix.compiler.sensitivity.sqnr import SQNRConfig

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS", "ALPSConfig", "EAGLConfig", "Executor", "HAWQConfig", "LIMPQConfig", "Method", "MethodConfig",
    "ProcessExecutor", "SQNRConfig", "ScoreContext", "Scores", "SerialExecutor", "check_inputs", "data_free",
    "executor_for", "label_free", "open_executor",
    "register", "relative_to_highest", "resolve", "score", "seeded", "strategy",
]
