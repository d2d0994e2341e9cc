"""Measurement of one (assignment, seed): fake-quantize, fine-tune with the recipe, lower onto the packed
kernels and evaluate there; runs on the executor's workers (the prepared model travels as a `PortableModel`)."""

from __future__ import annotations

import time
from typing import Any

from bitmix.task import FinetuneConfig, TaskData


def measure(job: tuple[tuple[tuple[str, int], ...], int], prepared: Any, data: TaskData, calibration: Any,
            recipe: FinetuneConfig, check_fake_quant: bool) -> dict[str, Any]:
    """Fake-quantize, fine-tune with the recipe, lower onto the packed kernels, evaluate there."""
    from bitmix.compiler.lower import lower
    from bitmix.compiler.quantize import fake_quantize, finetune

    assignment, seed = dict(job[0]), job[1]
    start = time.perf_counter()
    fq = fake_quantize(prepared.module, assignment, calibration, share_float_passes=True)
    tuned = finetune(fq, data, recipe.epochs, recipe.lr_for(assignment), recipe.optimizer, seed=seed,
                     batch_size=recipe.batch_size)
    finetune_s = time.perf_counter() - start
    kernels = lower(tuned).module
    result: dict[str, Any] = {"finetune_s": finetune_s}
    if data.details is not None:  # the task's own metrics; one pass may give the main metric too
        result["details"] = data.details(kernels, data)
        result["quality"] = result["details"].get(data.metric)
    if result.get("quality") is None:
        result["quality"] = data.evaluate(kernels)
    if check_fake_quant:
        result["quality_fake_quant"] = data.evaluate(tuned)
    result["measure_s"] = time.perf_counter() - start
    return result
