"""`executor=` as the user gives it (None, "local", "ray" or an object) → a running executor for one run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
            yield ex
    else:
        yield spec
