"""Executors for independent jobs (ALPS fine-tunes, HAWQ probe batches, the study's sweep points).

An executor runs `fn(job)` for every job: `as_completed` yields `(index, result)` as jobs
finish, `map` returns the results in job order and counts finished jobs on a rich bar.
Every executor runs jobs at `threads` torch (and numba) threads, so the same seed gives
bit-identical results whichever executor runs them on one machine. A job that raises is
reported in one line naming it (`describe(job)`).

`SerialExecutor` runs in this process; `ProcessExecutor` forks a local pool, so the jobs'
closures (GraphModules do not pickle) are inherited rather than serialised; `RayExecutor`
(`ray_executor.py`) ships them once through Ray's object store (`portable.PortableModel`).
Results must be plain data.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from bitmix.errors import BitmixError

Describe = Callable[[Any], str]


class Executor(Protocol):
    workers: int

    def as_completed(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                     describe: Describe = repr) -> Iterator[tuple[int, Any]]: ...

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], describe: Describe = repr,
            label: str = "jobs") -> list[Any]: ...


def worker_threads(threads: int) -> None:
    """Pin torch and numba to `threads` threads in this process (a job's results depend on it)."""
    import numba

    from bitmix.kernels.threads import configure_threading

    torch.set_num_threads(threads)
    configure_threading()  # before numba.set_num_threads starts Numba's pool
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    import numba

    from bitmix.kernels.threads import configure_threading

    # numba.get_num_threads starts Numba's pool: choose bitmix's layer first, or the pool starts on Numba's
    # default (omp) and a ProcessExecutor forked afterwards loses its workers
    configure_threading()
    saved = torch.get_num_threads(), numba.get_num_threads()
    worker_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def job_error(describe: Describe, job: Any, exc: BaseException) -> BitmixError:
    """One line: which job, which error."""
    text = str(exc).strip().splitlines()
    return BitmixError(f"job {describe(job)} failed: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))


class MapMixin:
    """`map` on top of `as_completed`, with a progress bar over finished jobs."""

    def as_completed(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                     describe: Describe = repr) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], describe: Describe = repr,
            label: str = "jobs") -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        with progress(len(jobs), label) as advance:
            for i, result in self.as_completed(fn, jobs, describe):
                results[i] = result
                advance()
        return results


class SerialExecutor(MapMixin):
    """Run jobs one after another in this process."""

    workers = 1

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def as_completed(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                     describe: Describe = repr) -> Iterator[tuple[int, Any]]:
        with pinned_threads(self.threads):
            for i, job in enumerate(jobs):
                try:
                    result = fn(job)
                except Exception as exc:
                    raise job_error(describe, job, exc) from exc
                yield i, result


_TASK: dict[str, Callable[[Any], Any]] = {}


def _run(job: Any) -> Any:
    return _TASK["fn"](job)


class ProcessExecutor(MapMixin):
    """A local pool of forked worker processes, each running torch on `threads` threads."""

    def __init__(self, workers: int = 2, threads: int = 1) -> None:
        self.workers = max(1, workers)
        self.threads = threads

    def as_completed(self, fn: Callable[[Any], Any], jobs: Sequence[Any],
                     describe: Describe = repr) -> Iterator[tuple[int, Any]]:
        if self.workers == 1 or len(jobs) <= 1:
            yield from SerialExecutor(self.threads).as_completed(fn, jobs, describe)
            return
        _TASK["fn"] = fn  # inherited by the forked workers, never pickled
        ctx = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(self.workers, ctx, worker_threads, (self.threads,))
        try:
            futures = {pool.submit(_run, job): i for i, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool as exc:
                    raise BitmixError(f"a worker process died running job {describe(jobs[i])}; the local pool "
                                      "cannot retry it (the ray executor retries jobs whose worker dies)") from exc
                except Exception as exc:
                    raise job_error(describe, jobs[i], exc) from exc
                yield i, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _TASK.clear()


def executor_for(workers: int) -> Executor:
    return ProcessExecutor(workers) if workers > 1 else SerialExecutor()


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich bar counting finished jobs, for a person at a terminal (else a no-op)."""
    from bitmix.compiler.progress import progress_enabled

    if not progress_enabled() or total <= 1:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
