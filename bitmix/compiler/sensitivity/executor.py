"""Executors for independent scoring jobs (ALPS runs one fine-tune per layer and precision).

Anything with `map(fn, jobs) -> list` fits; a distributed engine can plug in later.
`ProcessExecutor` forks, so the (unpicklable) exported GraphModules that jobs close
over are inherited by the workers instead of being serialised; results must pickle.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

import torch


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]: ...


class SerialExecutor:
    """Run jobs one after another in this process."""

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        return [fn(job) for job in jobs]


_TASK: dict[str, Callable[[Any], Any]] = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(job: Any) -> Any:
    return _TASK["fn"](job)


class ProcessExecutor:
    """A local pool of forked worker processes, each running torch on `threads` threads."""

    def __init__(self, workers: int = 2, threads: int = 1) -> None:
        self.workers = max(1, workers)
        self.threads = threads

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        if self.workers == 1 or len(jobs) <= 1:
            return SerialExecutor().map(fn, jobs)
        _TASK["fn"] = fn  # inherited by the forked workers, never pickled
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(self.workers, ctx, _init_worker, (self.threads,)) as pool:
                return list(pool.map(_run, jobs))
        finally:
            _TASK.clear()


def executor_for(workers: int) -> Executor:
    return ProcessExecutor(workers) if workers > 1 else SerialExecutor()
