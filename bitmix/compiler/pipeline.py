"""compile(): the only place that calls the stages in order.

capture → price → score → allocate → quantize (LSQ, optional QAT) → lower → simulate → report.
Each stage is a function over frozen records; this file wires them, times them and
turns what the user passed (budget, data, targets) into what the stages expect.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from bitmix.compiler.allocate import Allocation, Budget, allocate, cheapest_fraction
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import CallRecorder, executed_layers, lower, torch_on_one_thread
from bitmix.compiler.quantize import fake_quantize
from bitmix.compiler.quantize import finetune as qat_finetune
from bitmix.errors import BitmixError
from bitmix.ir.cost import CostModel
from bitmix.ir.graph import LayerGraph
from bitmix.ir.targets import Target, get_target
from bitmix.report.report import LayerRow, Report
from bitmix.simulator import ChipConfig, SimResult, load_chip_config, price, simulate, simulate_calls
from bitmix.task import FinetuneConfig, Inputs, TaskData

CALIBRATION_SAMPLES = 128


class CompiledModel(nn.Module):
    """The lowered model: `cm(x)` runs on the packed int kernels; `cm.report` says what it costs."""

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

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch_on_one_thread():
            return self.lowered(*args)

    def simulate(self, engine: str = "analytic") -> SimResult:
        """Price the kernel calls executed since the last `reset_calls()` (shapes as run)."""
        if not self.recorder.calls:
            raise BitmixError("no kernel calls recorded yet; run the compiled model on an input first")
        layers, vector_ops = executed_layers(self.graph, self.recorder.calls)
        assignment = {layer.name: self.assignment[self.recorder.calls[i][0]] for i, layer in enumerate(layers)}
        return simulate_calls(layers, assignment, vector_ops, self.chip, engine, self.graph.model_name)

    def reset_calls(self) -> None:
        self.recorder.calls.clear()


def compile(  # noqa: A001 - the public verb, as in torch.compile
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    target: str | Target = "int4int2-npu",
    method: str = "eagl",
    budget: float | None = 0.75,
    calibration: Any = None,
    finetune: FinetuneConfig | int | None = None,
    eval: TaskData | Callable[[nn.Module], float] | None = None,  # noqa: A002 - public keyword
    data: TaskData | None = None,
    fps: float | None = None,
    latency_s: float | None = None,
    energy_j: float | None = None,
    chip_config: str | None = None,
    seed: int = 0,
    name: str | None = None,
    frontier_points: int = 6,
    method_options: dict[str, Any] | None = None,
    clamp_budget: bool = False,
) -> CompiledModel:
    """Compile `model` to per-layer 2/4/8-bit kernels for `target` within `budget`.

    budget: simulated cost allowed, as a fraction of the all-highest-choice assignment;
      or give an absolute goal instead (`fps=`, `latency_s=`, `energy_j=` per frame).
    calibration: unlabeled inputs (a tensor, a tuple of tensors, an iterable of batches, or a
      TaskData) used for activation step sizes and data-driven scores.
    data: labeled (or FP32-target) TaskData for methods that train (alps, hawq, limpq) and for QAT.
    finetune: epochs (or a FinetuneConfig) of LSQ fine-tuning after allocation; needs data.
    eval: TaskData or a callable model -> quality (%), measured on FP32, fake-quant and kernels.
    clamp_budget: if the budget fraction is below the cheapest assignment, use the cheapest one
      (with a warning) instead of raising; the torch.compile backend sets it.
    """
    from bitmix.compiler import sensitivity

    timings: dict[str, float] = {}
    warn: list[str] = []
    tgt = get_target(target, chip_config)
    chip = load_chip_config(tgt.chip_config)
    goal = _budget(budget, fps, latency_s, energy_j)
    strategy = sensitivity.strategy(method)
    if isinstance(calibration, TaskData) and data is None:
        data = calibration
    if isinstance(eval, TaskData) and data is None:
        data = eval
    calib = _calibration_inputs(calibration if calibration is not None else data)
    ft = FinetuneConfig(epochs=finetune) if isinstance(finetune, int) else finetune
    if ft is not None and ft.epochs > 0 and data is None:
        raise BitmixError("finetune needs training data; pass data=TaskData(...) (or calibration=TaskData)")

    with _stage("capture", timings):
        graph = capture(model, example_inputs, name)
        _check_finite(graph)
    if graph.unsupported:
        msg = f"{len(graph.unsupported)} op(s) have no bitmix kernel and stay FP32: {', '.join(graph.unsupported)}"
        warnings.warn(msg, stacklevel=2)
        warn.append(msg)
    with _stage("price", timings):
        costs = price(graph, tgt, chip)
    with _stage("prepare", timings):
        float_model = prepare(graph)
    names = graph.names
    with _stage("score", timings):
        ctx = sensitivity.ScoreContext(graph=graph, target=tgt, model=float_model, data=data, calibration=calib,
                                       seed=seed, **dict(method_options or {}))
        scores = sensitivity.score(method, ctx)
    if clamp_budget and goal.fraction is not None:
        cheapest = cheapest_fraction(costs) * (1 + 1e-9)
        if goal.fraction < cheapest:
            msg = f"budget {goal.fraction} is below the cheapest assignment ({cheapest:.4f}); using {cheapest:.4f}"
            warnings.warn(msg, stacklevel=2)
            warn.append(msg)
            goal = Budget(fraction=cheapest)
    with _stage("allocate", timings):
        chosen = allocate(scores, costs, tgt, names, goal, strategy=strategy, seed=seed)
    assignment = dict(chosen.assignment)
    with _stage("quantize", timings):
        fq = fake_quantize(float_model, assignment, calib)
    if ft is not None and ft.epochs > 0:
        assert data is not None
        with _stage("finetune", timings):
            fq = qat_finetune(fq, data, ft.epochs, ft.lr, ft.optimizer, seed=seed, batch_size=ft.batch_size)
    with _stage("lower", timings):
        lowered = lower(fq)
    with _stage("simulate", timings):
        sim = simulate(graph, assignment, chip)
    cm = CompiledModel(lowered.module, graph, assignment, tgt, chip, lowered.recorder, fq)
    accuracy = {"metric": None, "fp32": None, "fake_quant": None, "kernels": None}
    if eval is not None:
        with _stage("evaluate", timings):
            accuracy = _accuracy(eval, float_model, fq, cm)
    frontier, uniform_pts = [], []
    if frontier_points > 0:
        with _stage("frontier", timings):
            frontier, uniform_pts = _frontier(graph, float_model, scores, costs, tgt, chip, calib, eval,
                                              frontier_points, goal)
    cm.recorder.calls.clear()
    cm.report = _report(graph, tgt, method, goal, chosen, scores, sim, accuracy, timings, frontier, uniform_pts, warn)
    return cm


def _budget(budget: float | None, fps: float | None, latency_s: float | None, energy_j: float | None) -> Budget:
    goals = {k: v for k, v in (("fps", fps), ("latency_s", latency_s), ("energy_j", energy_j)) if v is not None}
    for key, value in goals.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise BitmixError(f"{key} must be a positive number, got {value!r}")
    if goals:  # allocate holds the simulated fps / latency / energy per frame to these
        return Budget(fps=fps, latency_s=latency_s, energy_j=energy_j)
    if budget is None or isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise BitmixError(f"budget must be a number (fraction of the all-highest cost), got {budget!r}")
    if budget <= 0:
        raise BitmixError(f"budget must be > 0 (a fraction of the all-highest cost, e.g. 0.75), got {budget}")
    return Budget(fraction=float(budget))


def _calibration_inputs(source: Any) -> Inputs | None:
    """First CALIBRATION_SAMPLES inputs from a tensor, tuple, TaskData or iterable of batches."""
    if source is None:
        return None
    if isinstance(source, TaskData):
        return source.calibration(CALIBRATION_SAMPLES)
    if isinstance(source, torch.Tensor):
        return (source[:CALIBRATION_SAMPLES],)
    if isinstance(source, tuple) and all(isinstance(t, torch.Tensor) for t in source):
        return tuple(t[:CALIBRATION_SAMPLES] for t in source)
    if isinstance(source, Iterable):
        batches: list[Inputs] = []
        count = 0
        for batch in _iter(source):
            batches.append(batch)
            count += batch[0].shape[0]
            if count >= CALIBRATION_SAMPLES:
                break
        if not batches:
            raise BitmixError("calibration data is empty; pass at least one batch of inputs")
        return tuple(torch.cat(parts)[:CALIBRATION_SAMPLES] for parts in zip(*batches, strict=True))
    raise BitmixError(f"calibration must be a tensor, a tuple of tensors, a DataLoader or TaskData, "
                      f"got {type(source).__name__}")


def _iter(source: Iterable) -> Iterator[Inputs]:
    for batch in source:
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        elif isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
            # (inputs, labels) pairs from a DataLoader: keep the inputs only
            yield (batch[0],) if len(batch) == 2 and batch[1].dtype == torch.long else tuple(batch)
        else:
            raise BitmixError("calibration batches must be tensors or (inputs, labels) tuples of tensors")


def _check_finite(graph: LayerGraph) -> None:
    state = graph.exported.state_dict
    for layer in graph.layers:
        for key in (layer.weight_param, layer.bias_param):
            if key is not None and key in state and not torch.isfinite(state[key]).all():
                raise BitmixError(f"parameter {key!r} of layer {layer.name!r} contains NaN or Inf; "
                                  "fix the weights (e.g. retrain or reload the checkpoint) before compiling")


def _accuracy(evaluator: TaskData | Callable[[nn.Module], float], float_model: nn.Module, fq: nn.Module,
              cm: CompiledModel) -> dict[str, Any]:
    if isinstance(evaluator, TaskData):
        metric = evaluator.metric
        result: dict[str, Any] = {"metric": metric, "fp32": evaluator.evaluate(float_model),
                                  "fake_quant": evaluator.evaluate(fq), "kernels": evaluator.evaluate(cm)}
        if metric == "cosine":
            from bitmix.zoo.minilm import fidelity

            result["details"] = {"fake_quant": fidelity(fq, evaluator), "kernels": fidelity(cm, evaluator)}
        return result
    with torch.no_grad():
        return {"metric": getattr(evaluator, "__name__", "custom"), "fp32": float(evaluator(float_model)),
                "fake_quant": float(evaluator(fq)), "kernels": float(evaluator(cm))}


def _quality(evaluator: Any, model: nn.Module) -> float | None:
    if isinstance(evaluator, TaskData):
        return evaluator.evaluate(model)
    if callable(evaluator):
        with torch.no_grad():
            return float(evaluator(model))
    return None


def _frontier(graph: LayerGraph, float_model: nn.Module, scores: dict, costs: CostModel, tgt: Target, chip: ChipConfig,
              calib: Inputs | None, evaluator: Any, points: int, goal: Budget) -> tuple[list[dict], list[dict]]:
    """Knapsack solutions across budgets plus the uniform points, each simulated (and measured if eval given)."""
    from bitmix.compiler.allocate import frontier as pareto

    names = graph.names
    pinned = tgt.pinned(names)
    result = []
    if any(v for d in scores.values() for v in d.values()) and len(tgt.choices) > 1:
        lowest = cheapest_fraction(costs)
        fractions = sorted({max(lowest, f) for f in np.linspace(lowest, 1.0, points).round(4).tolist()})
        for alloc in pareto(scores, costs, tgt, names, fractions):
            result.append(_point(graph, float_model, alloc.assignment, chip, calib, evaluator,
                                 fraction=round(alloc.fraction, 4), predicted_drop=alloc.objective))
    uniform_pts = []
    for bits in tgt.choices:
        assignment = {n: pinned.get(n, bits) for n in names}
        uniform_pts.append(_point(graph, float_model, assignment, chip, calib, evaluator, bits=bits,
                                  predicted_drop=sum(scores.get(n, {}).get(bits, 0.0) for n in names)))
    return result, uniform_pts


def _point(graph: LayerGraph, float_model: nn.Module, assignment: dict[str, int], chip: ChipConfig,
           calib: Inputs | None, evaluator: Any, **extra: Any) -> dict[str, Any]:
    sim = simulate(graph, assignment, chip)
    quality = _quality(evaluator, fake_quantize(float_model, assignment, calib)) if evaluator is not None else None
    return {**extra, "throughput_fps": sim.throughput_fps, "energy_per_frame_j": sim.energy_per_frame_j,
            "quality": quality, "assignment": assignment}


def _report(graph: LayerGraph, tgt: Target, method: str, goal: Budget, chosen: Allocation, scores: dict,
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
    from bitmix.kernels import ACTIVE_PATH

    info = {"achieved_fraction": chosen.fraction, "chips": chosen.chips, "solver": chosen.solver,
            "optimality_gap": chosen.gap,
            "kernel_path": ACTIVE_PATH, "layers": len(graph.layers), "total_macs": graph.total_macs}
    return Report(graph.model_name, tgt.name, method, budget, tuple(rows), simulated, accuracy, timings,
                  tuple(frontier), tuple(uniform_pts), dict(sim.energy_breakdown_j), tuple(warn), info)


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a stage; show a spinner for a person at a terminal."""
    start = time.perf_counter()
    show = sys.stderr.isatty() and os.environ.get("BITMIX_QUIET", "") != "1"
    if show:
        from rich.console import Console

        with Console(stderr=True).status(f"bitmix: {name}…"):
            yield
    else:
        yield
    timings[name] = time.perf_counter() - start
