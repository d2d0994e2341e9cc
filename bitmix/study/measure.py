"""Measurement of one (assignment, seed): fake-quantize, fine-tune with the recipe, lower onto the packed
kernels and evaluate there; run in forked workers that inherit the prepared model (GraphModules do not pickle)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

STATE: dict[str, Any] = {}  # what the forked workers inherit: prepared model, data, recipe


def _init_worker() -> None:
    import numba

    from bitmix.kernels.threads import configure_threading

    torch.set_num_threads(1)
    configure_threading()  # before numba.set_num_threads starts Numba's pool
    numba.set_num_threads(1)


def measure(job: tuple[tuple[tuple[str, int], ...], int]) -> dict[str, Any]:
    """Fake-quantize, fine-tune with the recipe, lower onto the packed kernels, evaluate there."""
    from bitmix.compiler.lower import lower
    from bitmix.compiler.quantize import fake_quantize, finetune

    assignment, seed = dict(job[0]), job[1]
    prepared, data, calibration, recipe = (STATE[k] for k in ("prepared", "data", "calibration", "recipe"))
    start = time.perf_counter()
    fq = fake_quantize(prepared, assignment, calibration)
    tuned = finetune(fq, data, recipe.epochs, recipe.lr, recipe.optimizer, seed=seed, batch_size=recipe.batch_size)
    finetune_s = time.perf_counter() - start
    kernels = lower(tuned).module
    result: dict[str, Any] = {"finetune_s": finetune_s}
    if data.details is not None:  # the task's own metrics; one pass may give the main metric too
        result["details"] = data.details(kernels, data)
        result["quality"] = result["details"].get(data.metric)
    if result.get("quality") is None:
        result["quality"] = data.evaluate(kernels)
    if STATE["check_fake_quant"]:
        result["quality_fake_quant"] = data.evaluate(tuned)
    result["measure_s"] = time.perf_counter() - start
    return result


def run_jobs(jobs: list[tuple], workers: int, on_result: Callable[[tuple, dict], None]) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(job, measure(job))
        return
    ctx = multiprocessing.get_context("fork")  # workers inherit STATE (GraphModules do not pickle)
    with ProcessPoolExecutor(workers, ctx, _init_worker) as pool:
        futures = {pool.submit(measure, job): job for job in jobs}
        for future in as_completed(futures):
            on_result(futures[future], future.result())
