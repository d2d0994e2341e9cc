"""Per-layer sensitivity methods behind one registry: `score(method, ctx) -> Scores`.

One file per method, each registering itself with `@register(name)`:
eagl (data-free entropy), alps (one-epoch fine-tune per layer), hawq (Hessian trace),
limpq (learned per-bit steps), sqnr (label-free output SQNR), and the allocation
baselines uniform / random (zero scores; `strategy(method)` names the allocator).
"""

from bitmix.compiler.sensitivity import alps, baselines, eagl, hawq, limpq, sqnr  # noqa: F401  (registration)
from bitmix.compiler.sensitivity.base import (
    METHODS,
    Method,
    ScoreContext,
    Scores,
    register,
    relative_to_highest,
    score,
    strategy,
)
from bitmix.compiler.sensitivity.executor import (
    Executor,
    ProcessExecutor,
    SerialExecutor,
    executor_for,
    open_executor,
)

__all__ = [
    "METHODS", "Executor", "Method", "ProcessExecutor", "ScoreContext", "Scores", "SerialExecutor",
    "executor_for", "open_executor", "register", "relative_to_highest", "score", "strategy",
]
