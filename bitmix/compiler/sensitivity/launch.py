"""`executor=` as the user gives it (None, "local", "ray" or an object) → a running executor for one run."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bitmix.compiler.sensitivity.executor import Executor
from bitmix.compiler.sensitivity.ray_executor import RayExecutor
from bitmix.errors import BitmixError


@contextmanager
def open_executor(spec: str | Executor | None) -> Iterator[Executor | None]:
    """Resolve `executor=`: None / "local" (the method picks from `workers`), "ray" (a local Ray
    sized to the machine, shut down afterwards) or an executor object (a RayExecutor joins its
    `address` if not started yet and leaves again afterwards)."""
    if spec is None or spec == "local":
        yield None
        return
    if spec == "ray":
        spec = RayExecutor()
    elif isinstance(spec, str):
        raise BitmixError(f"unknown executor {spec!r}; use 'local', 'ray' or an executor object")
    if hasattr(spec, "__enter__"):
        with spec as ex:  # type: ignore[attr-defined]
            yield CheckedExecutor(ex)
    else:
        yield CheckedExecutor(spec)


class CheckedExecutor:
    """An executor object held to what the methods rely on: an int `workers` >= 1 (HAWQ splits its probes by it)
    and `map(fn, jobs, describe=..., label=...)` returning one result per job, in order. A short result list
    made HAWQ score every layer 0 without a word; the rest failed with raw TypeErrors and ValueErrors."""

    def __init__(self, inner: Executor) -> None:
        name = type(inner).__name__
        workers = getattr(inner, "workers", None)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise BitmixError(f"executor {name} needs an int `workers` >= 1 (jobs it runs at once), got {workers!r}")
        try:
            params = inspect.signature(inner.map).parameters
        except (TypeError, ValueError):  # a builtin without a signature: let it run
            params = {}
        keywords = any(p.kind is p.VAR_KEYWORD for p in params.values()) or {"describe", "label"} <= set(params)
        if params and not keywords:
            raise BitmixError(f"executor {name}.map must take map(fn, jobs, describe=..., label=...) "
                              "(see bitmix.compiler.sensitivity.executor.MapMixin)")
        self.inner, self.workers, self.name = inner, workers, name

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], describe: Callable[[Any], str] = repr,
            label: str = "jobs") -> list[Any]:
        results = list(self.inner.map(fn, jobs, describe=describe, label=label))
        if len(results) != len(jobs):
            raise BitmixError(f"executor {self.name}.map returned {len(results)} results for {len(jobs)} jobs; "
                              "it must return one result per job, in the jobs' order")
        return results
