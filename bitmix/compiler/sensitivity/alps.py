"""ALPS: accuracy-aware layer precision selection by one-epoch fine-tuning (Bablani et al. 2023).

Protocol (methods.md §1.3; the paper body is not available): fake-quantize the model
at the highest choice (pinned layers at their bits) and fine-tune it
`base_epochs` with LSQ; this is the base. For every free layer and lower
precision, lower only that layer, fine-tune the whole network `epochs` and
measure quality; the reference is the base fine-tuned the same way with nothing
lowered. Every job uses the same seed (same batches, same order), so differences come
from the lowered layer, not from sampling noise. Quality is measured on a held-out
20 % of the training split (never the test split): `metric="loss"` (default,
continuous: task loss increase) or `"quality"` (metric drop in percentage points).
Jobs are independent and go through the context's `Executor` (serial when none is given; Ray ships
the base model once as a `PortableModel`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from bitmix.compiler.digest import update_with_tensor
from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.compiler.rotate import rotate_linears
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.compiler.sensitivity.executor import SerialExecutor
from bitmix.compiler.transport import PortableModel
from bitmix.errors import BitmixError, check_count, check_number
from bitmix.ir.precision import Precision
from bitmix.task import TaskData

HOLDOUT = 0.2
Job = tuple[str, Precision] | None  # (layer, precision it is lowered to); None: the reference
LayerInputs = dict[str, tuple[tuple, dict]]  # layer -> (args, kwargs) of its call
# base model -> (calibration, every layer's inputs on it): one pass per process instead of one per job
_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# prepared model -> {(state, assignment, calibration) key: the fake-quantized base}: every seed shares it
_BASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ALPSConfig(MethodConfig):
    """ALPS options: fine-tune length per job (a fraction = one truncated epoch), the base, lr, measure."""

    epochs: float = 1.0
    base_epochs: int = 1
    lr: float = 1e-4
    metric: str = "loss"  # "loss" or "quality"
    batch_size: int = 64  # memory grows with it
    calibration_size: int = 64  # fit-split inputs that initialise a lowered layer's activation steps

    def __post_init__(self) -> None:
        check_number("ALPSConfig.epochs", self.epochs)
        check_count("ALPSConfig.base_epochs", self.base_epochs, minimum=0)
        check_number("ALPSConfig.lr", self.lr)
        quality_drop_measure(self.metric)  # refuses an unknown metric
        check_count("ALPSConfig.batch_size", self.batch_size)
        check_count("ALPSConfig.calibration_size", self.calibration_size)


def holdout(data: TaskData, fraction: float = HOLDOUT) -> tuple[TaskData, TaskData]:
    """(fit, validation): the training split cut in two; validation plays the test role."""
    n = len(data.train)
    cut = n - max(1, int(round(n * fraction)))
    fit_idx, val_idx = torch.arange(cut), torch.arange(cut, n)
    fit = TaskData(data.name, data.metric, data.train.subset(fit_idx), data.train.subset(val_idx), data.info)
    return fit, TaskData(data.name, data.metric, data.train.subset(val_idx), data.train.subset(val_idx), data.info)


@torch.no_grad()
def mean_loss(model: nn.Module, data: TaskData, split: str = "test") -> float:
    """Example-weighted mean task loss over a split."""
    total, count = 0.0, 0
    for inputs, targets in data.batches(split, 256):
        total += float(data.loss(model(*inputs), targets)) * len(targets)
        count += len(targets)
    return total / max(1, count)


def quality_drop_measure(metric: str):
    """Lower-is-better measurement of a model on a split: loss, or negated task metric."""
    if metric == "loss":
        return mean_loss
    if metric == "quality":
        return lambda model, data, split="test": -data.evaluate(model, split)
    raise BitmixError(f"unknown ALPS metric {metric!r}; use 'loss' or 'quality'")


def _epochs(epochs: float, batches_per_epoch: int) -> tuple[int, int | None]:
    """Whole epochs, or one truncated epoch for a fraction."""
    if epochs >= 1:
        return int(round(epochs)), None
    return 1, max(1, int(math.ceil(epochs * batches_per_epoch)))


def _job(
    job: Job,
    base: PortableModel,
    fit: TaskData,
    calibration: tuple[torch.Tensor, ...],
    epochs: int,
    max_batches: int | None,
    lr: float,
    seed: int,
    metric: str,
    batch_size: int,
) -> float:
    model = base.module
    if job is not None:
        name, bits = job
        model = _lowered(model, name, bits, layer_inputs(model, calibration).get(name))
    # the reference fine-tunes a copy of the shipped base; a lowered job its own copy, in place
    tuned = finetune(model, fit, epochs, lr, optimizer="adam", seed=seed, batch_size=batch_size,
                     max_batches=max_batches, in_place=job is not None)
    return float(quality_drop_measure(metric)(tuned, fit, "test"))


def _lowered(base: nn.Module, name: str, bits: Precision, inputs: tuple[tuple, dict] | None) -> nn.Module:
    """A copy of `base` with one layer re-quantized at `bits` (its signedness kept), its new activation steps
    initialised on `inputs`, the layer's inputs in the base's pass over the calibration inputs: the layers
    before it are the base's, so a pass of the whole copy would hand it the same tensors (None: a layer
    that pass never reaches keeps its steps unset, as it would there)."""
    model = copy.deepcopy(base)
    layer = quant_layers(model)[name]
    signs = [q.signed if isinstance(q, LSQQuantizer) else None for q in (layer.a_quant, layer.b_quant)]
    if rotate_linears({name: layer}, {name: bits}):  # rotated at these bits as deployed: its input turns signed
        signs[0] = True
    layer.set_bits(bits, a_signed=signs[0], b_signed=signs[1])
    if inputs is not None:
        with torch.no_grad():
            layer(*inputs[0], **inputs[1])  # initialise the new activation steps; the others are already set
    return model


@torch.no_grad()
def layer_inputs(base: nn.Module, calibration: tuple[torch.Tensor, ...]) -> LayerInputs:
    """Every quantized layer's inputs in one no-grad pass of `base` over `calibration` (its first
    call's, as a layer the graph calls twice initialises its steps there), kept per process for the jobs."""
    cached = _INPUTS.get(base)
    if cached is not None and cached[0] is calibration:
        return cached[1]
    inputs: LayerInputs = {}

    def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.setdefault(layer.name, (args, kwargs))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in quant_layers(base).values()]
    try:
        base(*calibration)
    finally:
        for h in handles:
            h.remove()
    _INPUTS[base] = (calibration, inputs)
    return inputs


def _base(model: nn.Module, assignment: dict[str, Precision], calibration: tuple[torch.Tensor, ...]) -> nn.Module:
    """`fake_quantize(model, assignment, calibration)`, computed once per process for every seed's base (it
    does not depend on the seed); the key holds the model's tensors' versions, so an in-place change misses.
    Callers must not change the result (`finetune` trains a copy)."""
    tensors = [*model.parameters(), *model.buffers()]
    digest = hashlib.sha1()
    for t in calibration:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        update_with_tensor(digest, t)
    key = (tuple((t.data_ptr(), t._version) for t in tensors), tuple(sorted(assignment.items())), digest.hexdigest())
    bases = _BASES.setdefault(model, {})
    if key not in bases:
        bases.clear()
        bases[key] = fake_quantize(model, assignment, calibration)
    return bases[key]


def _describe(job: Job) -> str:
    return "alps reference (no layer lowered)" if job is None else f"alps: layer {job[0]} at {job[1]} bits"


@dataclass(frozen=True)
class ALPSJobs:
    """ALPS's independent jobs: `run(job)` fine-tunes the shipped base with `job`'s layer lowered
    (None: nothing lowered, the reference) and returns its measured quality."""

    run: Callable[[Job], float]
    jobs: list[Job]
    choices: tuple[Precision, ...]
    free_layers: tuple[str, ...]

    def scores(self, results: list[float]) -> Scores:
        """The per-layer scores from the jobs' results (in job order)."""
        scores: Scores = {n: {self.choices[0]: results[0]} for n in self.free_layers}
        for job, value in zip(self.jobs[1:], results[1:], strict=True):
            assert job is not None
            scores[job[0]][job[1]] = value
        return scores


def alps_jobs(ctx: ScoreContext, cfg: ALPSConfig) -> ALPSJobs:
    """Fine-tune the base (in this process) and build the per-layer jobs around it."""
    data = ctx.require_data("alps")
    fit, _ = holdout(data)
    calibration = fit.calibration(cfg.calibration_size)
    choices = ctx.target.choices
    assignment = {n: choices[0] for n in ctx.free_layers} | ctx.target.pinned(ctx.graph.names)
    base = finetune(_base(ctx.model, assignment, calibration), fit, cfg.base_epochs, cfg.lr, optimizer="adam",
                    seed=ctx.seed, batch_size=cfg.batch_size)
    epochs, max_batches = _epochs(cfg.epochs, math.ceil(len(fit.train) / cfg.batch_size))
    jobs: list[Job] = [None] + [(n, b) for n in ctx.free_layers for b in choices[1:]]
    run = partial(
        _job, base=PortableModel(ctx.graph, base), fit=fit, calibration=calibration, epochs=epochs,
        max_batches=max_batches, lr=cfg.lr, seed=ctx.seed, metric=cfg.metric, batch_size=cfg.batch_size,
    )
    return ALPSJobs(run, jobs, tuple(choices), tuple(ctx.free_layers))


@register("alps", config=ALPSConfig, needs_data=True)
def alps(ctx: ScoreContext, cfg: ALPSConfig) -> Scores:
    """Quality change after one fine-tuning epoch with one layer lowered."""
    work = alps_jobs(ctx, cfg)
    return work.scores((ctx.executor or SerialExecutor()).map(work.run, work.jobs, describe=_describe, label="alps"))
