"""compile(): the only place that calls the stages in order.

capture → price → score → allocate → quantize (LSQ, optional QAT) → lower → simulate → report.
Each stage is a function over frozen records; this file wires them and times them
(`inputs` turns what the user passed into what the stages expect, `legacy` the 0.1 keywords).
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from bitmix.budget import Budget
from bitmix.compiler import inputs, legacy, sensitivity
from bitmix.compiler.allocate import Allocation, allocate, cheapest_fraction, check_budget
from bitmix.compiler.allocate import Budget as Caps
from bitmix.compiler.capture import bind_examples, capture, forward_arguments
from bitmix.compiler.fidelity import guard
from bitmix.compiler.fold import prepare
from bitmix.compiler.frozen import train_mode_modules
from bitmix.compiler.heap import release_freed_memory
from bitmix.compiler.inputs import CompileOptions
from bitmix.compiler.lower import CallRecorder, executed_layers, lower, torch_on_one_thread, warn_without_autograd
from bitmix.compiler.pretrain import pretrain_stage
from bitmix.compiler.qlayer import MIN_STEP, LSQQuantizer, forget_weight_codes, quant_layers
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.quantize import finetune as qat_finetune
from bitmix.compiler.saving import Keepable, LoadedModel, refuse_tracing
from bitmix.compiler.sensitivity import MethodConfig
from bitmix.compiler.shapes import InputSpec
from bitmix.compiler.state import mutated_buffers, restore
from bitmix.errors import BitmixError
from bitmix.ir.cost import CostModel
from bitmix.ir.graph import LayerGraph, frames_of
from bitmix.ir.precision import as_precision, format_assignment
from bitmix.ir.targets import DEFAULT_TARGET, Target, get_target
from bitmix.report.report import LayerRow, Report
from bitmix.simulator import ChipConfig, SimResult, load_chip_config, price, simulate, simulate_calls
from bitmix.task import Data, FinetuneConfig, Inputs, TaskData

CALIBRATION_SAMPLES = inputs.CALIBRATION_SAMPLES

LOG = logging.getLogger("bitmix")


class CompiledModel(Keepable, nn.Module):
    """The lowered model: `cm(x)` runs on the packed int kernels; `cm.report` says what it costs.

    Its module tree is what `cm(x)` runs (`cm.lowered`): `parameters()`, `state_dict()`, `modules()`, `.train()`
    and `.eval()` see the kernels (their packed weights are no tensors), the float tensors of what stays FP32 and
    the buffers the forward writes: nothing that does not change `cm(x)`. The fake-quant twin (`cm.fake_quant`,
    a normal trainable module, bit-exact with the kernels in eval mode under `torch.no_grad()`) is an attribute,
    not a child: as a child, `Adam(cm.parameters())` trained it while `cm(x)` never changed, parameter counts
    included its float weights, and `cm.train()` put it in training mode (off the kernels' integer path).
    """

    def __init__(self, lowered: nn.Module, graph: LayerGraph, assignment: dict[str, int], target: Target,
                 chip: ChipConfig, recorder: CallRecorder, fake_quant: nn.Module) -> None:
        super().__init__()
        self.lowered = lowered
        self.graph = graph
        self.assignment = dict(assignment)
        self.target = target
        self.chip = chip
        self.recorder = recorder
        self.fake_quant = fake_quant
        self.report: Report | None = None
        self.training = False  # what it runs is the model's eval mode, as `lowered` and `fake_quant` are

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "fake_quant":  # kept out of the module tree (the class docstring), also when reassigned
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        args = self.input_spec.bind(args, kwargs)
        self.input_spec.check(args)
        args = self.input_spec.cast(args)
        warn_without_autograd(self, args)
        self.recorder.calls.clear()  # one forward's calls: a serving loop's record stays one pass long
        self.recorder.frames = frames_of([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        with (torch.no_grad(), torch_on_one_thread(), self.input_spec.index_errors(args),
              self.input_spec.empty_batch_errors(args)):
            return self.lowered(*args)

    def simulate(self, engine: str = "analytic") -> SimResult:
        """Price the kernel calls of the last forward pass (shapes as run; `reset_calls()` forgets them)."""
        if not self.recorder.calls:
            raise BitmixError("no kernel calls recorded yet; run the compiled model on an input first")
        if self.recorder.frames == 0:
            raise BitmixError("the last forward ran on an empty batch: there is no work to price; run the compiled "
                              "model on at least one example first")
        layers, vector_ops, assignment = executed_layers(self.graph, self.recorder.calls, self.assignment)
        return simulate_calls(layers, assignment, vector_ops, self.chip, engine, self.graph.model_name,
                              self.recorder.frames)

    def reset_calls(self) -> None:
        self.recorder.calls.clear()


def compile(  # noqa: A001 - the public verb, as in torch.compile
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    target: str | Target = DEFAULT_TARGET,
    *,
    method: str | MethodConfig = "eagl",
    budget: Budget | float | None = None,
    data: Data | TaskData | Any = None,
    finetune: FinetuneConfig | int | None = None,
    seed: int = 0,
    options: CompileOptions | None = None,
    **deprecated: Any,
) -> CompiledModel:
    """Compile `model` to per-layer 2/4/8-bit kernels for `target` within `budget`.

    example_inputs: a tensor, a tuple of tensors in the forward's order, or a Mapping (a dict, a tokenizer's
      BatchEncoding) of forward argument name -> tensor as `model(**enc)` takes it; keyword-only arguments only
      this way. Left-out and non-tensor arguments keep their defaults, fixed at compile time. The inputs are
      bound once to the forward's signature: the compiled model takes the tensors by name, as `cm(**enc)`, or
      positionally in the forward's parameter order, left-out arguments skipped (`cm.input_spec.names`).
    target: a name in `bitmix.targets` or a `Target` (`.with_chip_config("chip.toml")` for another chip).
    method: a registered method's name (`eagl`, `alps`, ...) or its config (`ALPSConfig(epochs=0.5)`).
    budget: a fraction of the all-highest-choice simulated cost, or a `Budget` (absolute fps / latency_s /
      energy_j goals, `clamp=True`); None is `Budget.default`: 0.75, raised to the cheapest assignment
      where that costs more, and 1 for a one-choice target such as int8-npu.
    data: a TaskData (calibration, training and evaluation at once), unlabeled inputs (a tensor, tuple or
      iterable of batches: calibration only), or `Data(calibration=, train=, eval=)`.
    finetune: epochs (or a FinetuneConfig) of LSQ fine-tuning after allocation; needs a train role.
    The 0.1 keywords (calibration=, eval=, fps=, ...) still work for one release, with a DeprecationWarning.
    """
    try:
        return _compile(model, example_inputs, target, method, budget, data, finetune, seed, options, deprecated)
    finally:
        release_freed_memory()  # the compile's working memory, freed by now, back to the OS (`heap`)


def _compile(model: nn.Module, example_inputs: Any, target: str | Target, method: str | MethodConfig,
             budget: Budget | float | None, data: Any, finetune: FinetuneConfig | int | None, seed: int,
             options: CompileOptions | None, deprecated: dict[str, Any]) -> CompiledModel:
    """`compile`'s body: its locals (the float model, calibration activations) are gone when it returns."""
    if not isinstance(model, nn.Module):
        raise BitmixError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, CompiledModel | LoadedModel):
        raise BitmixError(f"the model is already compiled by bitmix (a {type(model).__name__}); compile the original "
                          "torch model instead")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise BitmixError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise BitmixError(f"seed must be an int from -2**63 to 2**64 - 1 (what torch.manual_seed takes), got {seed}")
    opts = options or CompileOptions()
    if not isinstance(opts, CompileOptions):
        raise BitmixError(f"options must be a bitmix.CompileOptions, got {type(opts).__name__}")
    points = opts.frontier_points
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 0:
        raise BitmixError(f"frontier_points must be an int >= 0 (0 = no frontier), got {points!r}")
    if not (opts.executor is None or isinstance(opts.executor, str) or callable(getattr(opts.executor, "map", None))):
        raise BitmixError(f"executor must be 'local', 'ray' or an executor object with a map method (e.g. "
                          f"RayExecutor(address=...) from bitmix.compiler.sensitivity.ray_executor), "
                          f"got {type(opts.executor).__name__}")
    if deprecated:
        method, budget, data, target, opts = legacy.translate(method, budget, data, target, opts, deprecated)
    timings: dict[str, float] = {}
    warn: list[str] = []
    tgt = get_target(target)
    chip = load_chip_config(tgt.chip_config)
    goal = Budget.default(len(tgt.choices) == 1) if budget is None else Budget.of(budget)
    caps = inputs.caps(goal)
    scorer, method_config = sensitivity.resolve(method)
    roles = inputs.resolve_data(data)
    tasks = [role for role in (roles.calibration, roles.train, roles.eval) if isinstance(role, TaskData)]
    warn.extend(dict.fromkeys(note for task in tasks for note in task.notes))  # warned when the data was read
    examples = bind_examples(model, example_inputs)
    ranks = tuple(t.dim() for t in examples.tensors)
    calib, cut = inputs.calibration_inputs(roles.calibration if roles.calibration is not None else roles.train,
                                           ranks, examples.names)
    sensitivity.check_inputs(scorer, roles.train is not None, calib is not None)  # before any slow stage
    ranges_from = calib if calib is not None else _example_calibration(examples.tensors, warn)
    if isinstance(finetune, bool) or not (finetune is None or isinstance(finetune, FinetuneConfig)
                                          or isinstance(finetune, numbers.Integral) and finetune >= 0):
        raise BitmixError(f"finetune must be a number of epochs >= 0 or a bitmix.FinetuneConfig, got {finetune!r}")
    ft = FinetuneConfig(epochs=int(finetune)) if isinstance(finetune, numbers.Integral) else finetune
    if ft is not None and ft.epochs > 0 and roles.train is None:
        raise BitmixError("finetune needs labelled training data: pass data=bitmix.Data(train=loader) (a DataLoader "
                          "of (inputs..., class labels)) or a bitmix.TaskData")

    training = train_mode_modules(model)
    if training:
        msg = (f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}); "
               "bitmix compiles what model.eval() computes (BatchNorm running statistics, no dropout): "
               "call model.eval() before compiling")
        _warn(msg, warn)
    with _stage("capture", timings):
        graph = capture(model, example_inputs, opts.name, opts.dynamic_shapes)
        _check_finite(graph)
        if calib is not None:
            _check_calibration(graph, calib)
        _check_scored_output(graph, roles)
    initial_state = mutated_buffers(graph.exported)  # buffers the forward writes, as the user's model holds them
    if cut is not None:
        _warn(cut, warn)
    for i in _constant_inputs(calib):
        msg = (f"calibration input {i} holds one value ({float(calib[i].reshape(-1)[0]):g}) in every example: "
               "activation ranges set from it will not cover real inputs, and the fidelity check on it cannot "
               "tell; pass representative inputs")
        _warn(msg, warn)
    if graph.unsupported:
        msg = (f"{len(graph.unsupported)} op(s) have no bitmix kernel and stay FP32 (the simulated cost leaves them "
               f"out): {', '.join(graph.unsupported)}")
        _warn(msg, warn)
    with _stage("price", timings):  # the costs, and the budget checked against them
        costs = price(graph, tgt, chip)
        for name, kept, left_out in zip(costs.names, costs.choices, costs.unfit, strict=True):
            if left_out:
                msg = (f"layer {name!r} does not fit one chip at {', '.join(map(str, left_out))} (a layer is never "
                       f"split over chips): it is allocated among {', '.join(map(str, kept))}, "
                       "and budget fractions are of the all-highest assignment that fits")
                _warn(msg, warn)
        if goal.clamp and caps.fraction is not None:
            cheapest = cheapest_fraction(costs)
            if caps.fraction < cheapest:
                msg = f"budget {caps.fraction} is below the cheapest assignment ({cheapest:.4f}); using {cheapest:.4f}"
                _warn(msg, warn)
                caps = Caps(fraction=cheapest)
        check_budget(costs, tgt, graph.names, caps)  # before the slow stages
    with _stage("prepare", timings):  # read-only: every stage that changes a model changes a copy of it
        float_model = prepare(graph, share_weights=True)
    names = graph.names
    with _stage("pretrain", timings):  # training at the highest choice, for methods that score a trained model
        trained = pretrain_stage(method_config.pretrain_step_lr_scale(), float_model, names, tgt, roles.train, seed)
    with _stage("score", timings), sensitivity.open_executor(opts.executor) as runner:
        ctx = sensitivity.ScoreContext(graph=graph, target=tgt, model=float_model, data=roles.train,
                                       calibration=calib, seed=seed, executor=runner, pretrained=trained)
        scores = sensitivity.score(method, ctx)
    with _stage("allocate", timings):
        chosen = allocate(scores, costs, tgt, names, caps, strategy=opts.strategy or scorer.strategy, seed=seed)
    assignment = dict(chosen.assignment)
    with _stage("quantize", timings):
        fq = fake_quantize(float_model, assignment, ranges_from)
    floored = [name for name, layer in quant_layers(fq).items() if isinstance(layer.a_quant, LSQQuantizer)
               and layer.a_quant.axis is None and float(layer.a_quant.step.detach().min()) <= MIN_STEP]
    if floored:
        msg = (f"the inputs of {len(floored)} layer(s) ({', '.join(floored[:3])}{', ...' if len(floored) > 3 else ''}) "
               f"span less than the smallest activation step ({MIN_STEP:g}) can resolve: they quantize to (nearly) "
               "zero; scale the model's inputs up (normalise them) before compiling")
        _warn(msg, warn)
    if ft is not None and ft.epochs > 0:
        assert roles.train is not None
        with _stage("finetune", timings):
            fq = qat_finetune(fq, roles.train, ft.epochs, ft.lr_for(assignment), ft.optimizer, seed=seed,
                              batch_size=ft.batch_size, teacher=float_model if ft.layer_distill > 0 else None,
                              layer_distill=ft.layer_distill, step_lr_scale=ft.step_lr_scale)
    with _stage("lower", timings):
        lowered = lower(fq)
    with _stage("simulate", timings):
        sim = simulate(graph, assignment, chip)
    cm = CompiledModel(lowered.module, graph, assignment, tgt, chip, lowered.recorder, fq)
    cm.input_spec = replace(cm.input_spec, arguments=forward_arguments(model, cm.input_spec.names))
    accuracy = {"metric": None, "fp32": None, "fake_quant": None, "kernels": None}
    if roles.eval is not None:
        with _stage("evaluate", timings):
            for module in (float_model, fq, cm.lowered):
                restore(module, initial_state)
            accuracy = _accuracy(roles.eval, float_model, fq, cm)
    frontier, uniform_pts = [], []
    if opts.frontier_points > 0:
        with _stage("frontier", timings):
            frontier, uniform_pts = _frontier(graph, float_model, scores, costs, tgt, chip, ranges_from, roles.eval,
                                              opts.frontier_points)
    with _stage("fidelity", timings):
        for module in (float_model, cm.lowered):
            restore(module, initial_state)  # both from the user's state, in step through the check's passes
        accuracy.update(guard(float_model, cm, calib, warn, fallback=examples.tensors, target=tgt.name,
                              full_budget=_all_highest(assignment, tgt),
                              finetuned=ft is not None and ft.epochs > 0))
    for module in (fq, cm.lowered):
        restore(module, initial_state)  # the first call starts where the user's model is, not after bitmix's passes
    forget_weight_codes(fq)  # the evaluation's cache: cm.fake_quant computes its codes again when it runs
    cm.recorder.calls.clear()
    cm.report = _report(graph, tgt, scorer.name, caps, chosen, scores, sim, accuracy, timings, frontier,
                        uniform_pts, warn)
    return cm


def _all_highest(assignment: dict[str, Any], tgt: Target) -> bool:
    """Every layer at the target's highest choice (or its pinned precision): a higher budget buys nothing."""
    top = {tgt.choices[0], tgt.pin_first_last}
    return all(as_precision(bits) in top for bits in assignment.values())


def _example_calibration(examples: Inputs, warn: list[str]) -> Inputs:
    """Without calibration data the ranges come from the example inputs (better than a data-free guess)."""
    msg = ("no calibration data: activation ranges come from the example inputs; "
           "pass data= (a few real inputs) for better accuracy")
    for i, t in enumerate(examples):
        if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():  # meta: `_check_finite`
            raise BitmixError(f"example input {i} contains NaN or Inf, and without data= the example inputs set the "
                              "activation ranges; pass finite examples, or calibration data with data=")
    warnings.warn(msg, stacklevel=4)  # this, `_compile`, `compile`, the caller
    warn.append(msg)
    return examples


def _warn(msg: str, warn: list[str]) -> None:
    """A compile warning: raised to the caller of `compile` and kept for the report."""
    warnings.warn(msg, stacklevel=4)  # this, `_compile`, `compile`, the caller
    warn.append(msg)


def _check_calibration(graph: LayerGraph, calib: Inputs) -> None:
    """Calibration batches the captured graph cannot run (another image size into a fixed-size graph) are one
    line here, not a shape error deep in the first calibration pass."""
    try:
        InputSpec.of(graph.exported).check(calib, batch=False)
    except BitmixError as exc:
        raise BitmixError(f"calibration data does not fit the model: {exc}") from None


def _constant_inputs(calib: Inputs | None) -> list[int]:
    """Float calibration inputs with one value throughout (all zeros, say): a model calibrated on them clips
    every real activation (a 3-layer MLP calibrated on zeros: cosine 0.41 to FP32 on random inputs)."""
    return [i for i, t in enumerate(calib or ()) if t.is_floating_point() and t.numel() > 1
            and bool((t == t.reshape(-1)[0]).all())]


def _check_finite(graph: LayerGraph) -> None:
    """Real numbers in the model's state: a layer's weights and bias finite, nothing else NaN (an -inf
    attention-mask buffer is fine). A NaN BatchNorm statistic, folded into the layer before it, otherwise
    surfaced as NaN outputs or as a NaN blamed on the next layer's input."""
    exported = graph.exported
    state = {**exported.state_dict, **exported.constants}
    owner = {key: layer.name for layer in graph.layers for key in (layer.weight_param, layer.bias_param) if key}
    buffers = set(exported.graph_signature.buffers)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        kind = "buffer" if key in buffers else "parameter"
        if value.is_meta:
            raise BitmixError(f"{kind} {key!r} is on the meta device (no values); materialise the model "
                              "(e.g. model.to_empty(device='cpu') and load_state_dict) before compiling")
        if key in owner and not torch.isfinite(value).all():
            raise BitmixError(f"parameter {key!r} of layer {owner[key]!r} contains NaN or Inf; "
                              "fix the weights (e.g. retrain or reload the checkpoint) before compiling")
        if torch.isnan(value).any():
            raise BitmixError(f"{kind} {key!r} contains NaN; fix the model's state (e.g. reload the checkpoint, "
                              "or BatchNorm statistics from a run that diverged) before compiling")


def _check_scored_output(graph: LayerGraph, roles: Data) -> None:
    """A TaskData scores and trains on one output tensor: say so before the slow stages, not at the end."""
    spec = graph.exported.call_spec.out_spec
    if spec is None or spec.is_leaf() or not any(isinstance(r, TaskData) for r in (roles.train, roles.eval)):
        return
    what = (f"a dict (keys {', '.join(map(repr, spec.context))})" if spec.type is dict
            else f"a {getattr(spec.type, '__name__', 'structure')} of {spec.num_children} outputs")
    raise BitmixError(f"a TaskData scores one output tensor, but the model returns {what}; wrap the model so that "
                      "forward returns the tensor to score, or pass data=Data(calibration=...) (eval= may be a "
                      "callable model -> quality)")


def _accuracy(evaluator: TaskData | Callable[[nn.Module], float], float_model: nn.Module, fq: nn.Module,
              cm: CompiledModel) -> dict[str, Any]:
    if isinstance(evaluator, TaskData):
        metric = evaluator.metric
        kernels = _any_batch(cm)
        result: dict[str, Any] = {"metric": metric, "fp32": evaluator.evaluate(float_model),
                                  "fake_quant": evaluator.evaluate(fq), "kernels": evaluator.evaluate(kernels)}
        if evaluator.details is not None:  # the task's own extra metrics
            result["details"] = {"fake_quant": evaluator.details(fq, evaluator),
                                 "kernels": evaluator.details(kernels, evaluator)}
        return result
    with torch.no_grad():
        return {"metric": getattr(evaluator, "__name__", "custom"), "fp32": float(evaluator(float_model)),
                "fake_quant": float(evaluator(fq)), "kernels": float(evaluator(cm))}


class _InBatchesOf(nn.Module):
    """A model compiled for one batch size (a static export) run on a task's batches: chunks of that size, the
    last padded with copies of its last example, whose outputs are dropped."""

    def __init__(self, model: nn.Module, batch: int) -> None:
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, inputs[0].shape[0], self.batch):
            chunk = [t[start:start + self.batch] for t in inputs]
            real = chunk[0].shape[0]
            pad = [torch.cat([c, c[-1:].expand(self.batch - real, *c.shape[1:])]) for c in chunk]
            outputs.append(self.model(*pad)[:real])
        return torch.cat(outputs)


def _any_batch(cm: CompiledModel) -> nn.Module:
    """`cm`, or `cm` in batches of its fixed batch size when every input's first dimension is fixed."""
    firsts = {dims[0] for dims in cm.input_spec.dims if dims}
    batch = firsts.pop() if len(firsts) == 1 else None
    return _InBatchesOf(cm, batch) if isinstance(batch, int) and batch > 0 else cm


def _quality(evaluator: Any, model: nn.Module) -> float | None:
    if isinstance(evaluator, TaskData):
        return evaluator.evaluate(model)
    if callable(evaluator):
        with torch.no_grad():
            return float(evaluator(model))
    return None


def _frontier(graph: LayerGraph, float_model: nn.Module, scores: dict, costs: CostModel, tgt: Target, chip: ChipConfig,
              calib: Inputs | None, evaluator: Any, points: int) -> tuple[list[dict], list[dict]]:
    """Knapsack solutions across budgets plus the uniform points, each simulated (and measured if eval given).

    Budgets that pick the same assignment (and a uniform point equal to a knapsack one, e.g. all-highest)
    are simulated, quantized and evaluated once: only the labels differ."""
    from bitmix.compiler.allocate import frontier as pareto

    names = graph.names
    pinned = tgt.pinned(names)
    measured: dict[tuple, dict[str, Any]] = {}

    def point(assignment: dict[str, Any], **extra: Any) -> dict[str, Any]:
        key = tuple(sorted(format_assignment(assignment).items()))
        if key not in measured:
            measured[key] = _measure(graph, float_model, assignment, chip, calib, evaluator)
        return {**extra, **measured[key]}

    result = []
    if any(v for d in scores.values() for v in d.values()) and len(tgt.choices) > 1:
        lowest = cheapest_fraction(costs)
        fractions = sorted({max(lowest, f) for f in np.linspace(lowest, 1.0, points).round(4).tolist()})
        for alloc in pareto(scores, costs, tgt, names, fractions):
            result.append(point(alloc.assignment, fraction=round(alloc.fraction, 4), predicted_drop=alloc.objective))
    uniform_pts = []
    for bits in tgt.choices:
        if any(bits in left_out for left_out in costs.unfit):
            continue  # a layer overflows a chip at these bits (`price`)
        assignment = {n: pinned.get(n, bits) for n in names}
        uniform_pts.append(point(assignment, bits=str(bits),
                                 predicted_drop=sum(scores.get(n, {}).get(bits, 0.0) for n in names)))
    return result, uniform_pts


def _measure(graph: LayerGraph, float_model: nn.Module, assignment: dict[str, int], chip: ChipConfig,
             calib: Inputs | None, evaluator: Any) -> dict[str, Any]:
    sim = simulate(graph, assignment, chip)
    quality = _quality(evaluator, fake_quantize(float_model, assignment, calib)) if evaluator is not None else None
    return {"throughput_fps": sim.throughput_fps, "energy_per_frame_j": sim.energy_per_frame_j,
            "quality": quality, "assignment": format_assignment(assignment)}


def _report(graph: LayerGraph, tgt: Target, method: str, goal: Caps, chosen: Allocation, scores: dict,
            sim: SimResult, accuracy: dict, timings: dict, frontier: list, uniform_pts: list,
            warn: list[str]) -> Report:
    pinned = tgt.pinned(graph.names)
    sim_layers = {row.name: row for row in sim.layers}
    rows = []
    for layer in graph.layers:
        s = sim_layers[layer.name]
        score = scores.get(layer.name, {}).get(tgt.lowest) if layer.name not in pinned else None
        rows.append(LayerRow(layer.name, layer.kind, chosen.assignment[layer.name], layer.macs, layer.params,
                             s.cycles, s.energy_j, score, s.bound, layer.name in pinned))
    for op in graph.unsupported:
        rows.append(LayerRow(op, "no kernel", None, 0, 0, 0.0, 0.0, None, "fp32", False))
    budget: float | dict[str, float] = goal.fraction if goal.fraction is not None else {
        k: v for k, v in (("fps", goal.fps), ("latency_s", goal.latency_s), ("energy_j", goal.energy_j))
        if v is not None}
    simulated = {k: getattr(sim, k) for k in ("cycles", "latency_s", "throughput_fps", "energy_per_frame_j",
                                               "power_w", "fps_per_w", "utilization", "chips", "frames")}
    from bitmix.kernels import dispatch

    info = {"achieved_fraction": chosen.fraction, "chips": chosen.chips, "solver": chosen.solver,
            "optimality_gap": chosen.gap,
            "kernel_path": dispatch.path, "layers": len(graph.layers), "total_macs": graph.total_macs}
    return Report(graph.model_name, tgt.name, method, budget, tuple(rows), simulated, accuracy, timings,
                  tuple(frontier), tuple(uniform_pts), dict(sim.energy_breakdown_j), tuple(warn), info)


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a stage; show a spinner for a person at a terminal, and log it (logger "bitmix", INFO) for scripts and
    CI, where a large model's quantize stage otherwise runs for minutes without a line."""
    start = time.perf_counter()
    LOG.info("bitmix: %s ...", name)
    show = sys.stderr.isatty() and os.environ.get("BITMIX_QUIET", "") != "1"
    if show:
        from rich.console import Console

        with Console(stderr=True).status(f"bitmix: {name}…"):
            yield
    else:
        yield
    timings[name] = time.perf_counter() - start
    LOG.info("bitmix: %s done in %.1f s", name, timings[name])
