"""What the user passed to `compile` → what the stages expect: options, data roles, calibration inputs, caps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bitmix.budget import Budget
from bitmix.compiler.allocate import Budget as Caps
from bitmix.compiler.ranges import examples_of
from bitmix.compiler.sensitivity.executor import Executor
from bitmix.errors import BitmixError
from bitmix.task import Data, Inputs, TaskData

CALIBRATION_SAMPLES = 128


@dataclass(frozen=True)
class CompileOptions:
    """Seldom-changed knobs of a compile.

    name: the model's name in the report (default: its class name).
    frontier_points: knapsack solutions across budgets on the report's frontier (0 = none; each is simulated,
      and measured when data has an eval role).
    strategy: how scores become an assignment (None: the method's own, the exact knapsack for scoring methods;
      "pareto-greedy" / "pareto-greedy-normalised": AIMET AMP's search, `compiler/pareto_greedy.py`).
    dynamic_shapes: "auto" (symbolic batch and, for integer inputs, sequence dims), None (static) or a
      torch.export spec (tuple, or dict by argument name).
    executor: where a method's independent jobs (ALPS/HAWQ per layer) run: None / "local" (in this process),
      "ray" (a local Ray sized to the machine, shut down afterwards) or an executor object
      (`RayExecutor(address=...)`, `ProcessExecutor(2)`); the same seed gives the same result on each.
    """

    name: str | None = None
    frontier_points: int = 6
    executor: Executor | str | None = None
    dynamic_shapes: Any = "auto"
    strategy: str | None = None


def resolve_data(data: Any) -> Data:
    """`data=` as a `Data` with checked roles (a TaskData plays every role; bare inputs calibrate)."""
    roles = Data.of(data)
    if roles.train is not None and not isinstance(roles.train, TaskData):
        roles = dataclasses.replace(roles, train=TaskData.classification(roles.train, "train"))
    if roles.eval is not None and not (isinstance(roles.eval, TaskData) or callable(roles.eval)):
        if not isinstance(roles.eval, Iterable) or isinstance(roles.eval, torch.Tensor):
            raise BitmixError(f"Data(eval=...) must be a TaskData, a DataLoader of (inputs..., class labels) or a "
                              f"callable model -> quality, got {type(roles.eval).__name__}")
        roles = dataclasses.replace(roles, eval=TaskData.classification(roles.eval, "eval"))
    return roles


def caps(budget: Budget) -> Caps:
    """The allocator's constraint for a user's Budget (it holds the simulated fps / latency / energy to the goals)."""
    if budget.fraction is not None:
        return Caps(fraction=float(budget.fraction))
    return Caps(fps=budget.fps, latency_s=budget.latency_s, energy_j=budget.energy_j)


def calibration_inputs(source: Any, example_ranks: tuple[int, ...], names: tuple[str, ...] = ()
                       ) -> tuple[Inputs | None, str | None]:
    """First CALIBRATION_SAMPLES inputs from a tensor, tuple, TaskData or iterable of batches, and a warning
    when the data held more (None otherwise); floating tensors as float32, what the compiled model computes in
    (as its calls cast them). `example_ranks` (the example inputs' ranks) says how many tensors the model
    takes: an iterable's batch with one item more is (inputs, labels); items with one dimension fewer than
    the example inputs are single examples. A dict batch gives its values at `names` (the forward's arguments
    the example inputs were bound to: `capture.bind_examples`, which binds a dict example the same way), as
    `cm(**batch)` would take them; other keys (labels) are dropped."""
    if source is None:
        return None, None
    calib, held = _calibration(source, example_ranks, names)
    cut = None if held is None else (f"calibration data holds {held}; bitmix calibrates on the first "
                                     f"{CALIBRATION_SAMPLES} and ignores the rest")
    return tuple(t.float() if t.is_floating_point() else t for t in calib), cut


def _calibration(source: Any, example_ranks: tuple[int, ...], names: tuple[str, ...]) -> tuple[Inputs, str | None]:
    """The calibration inputs, and how many examples the source held when that was more than were kept."""
    if isinstance(source, TaskData):  # a training set in the calibration role: its first examples, by design
        return source.calibration(CALIBRATION_SAMPLES), None
    if isinstance(source, torch.Tensor):
        return (source[:CALIBRATION_SAMPLES],), _held(len(source))
    if isinstance(source, tuple) and all(isinstance(t, torch.Tensor) for t in source):
        examples = examples_of(source)
        if examples is None:  # no shared batch dimension (1-D ids beside their offsets, a scalar)
            return source, None
        return tuple(t[:CALIBRATION_SAMPLES] for t in source), _held(examples)
    if isinstance(source, Iterable):
        batches: list[Inputs] = []
        count = 0
        items = iter(source)
        for batch in items:
            batch = _inputs_of(batch, len(example_ranks), names)
            if len(batch) == len(example_ranks) and all(t.dim() + 1 == r for t, r in zip(batch, example_ranks,
                                                                                           strict=True)):
                batch = tuple(t.unsqueeze(0) for t in batch)  # one example without its batch dimension
            batches.append(batch)
            count += batch[0].shape[0]
            if count >= CALIBRATION_SAMPLES:
                break
        if not batches:
            raise BitmixError("calibration data is empty; pass at least one batch of inputs")
        more = count > CALIBRATION_SAMPLES or count == CALIBRATION_SAMPLES and next(items, None) is not None
        calib = tuple(torch.cat(parts)[:CALIBRATION_SAMPLES] for parts in zip(*batches, strict=True))
        return calib, f"more than {CALIBRATION_SAMPLES} examples" if more else None  # the rest is never read
    raise BitmixError(f"calibration data must be a tensor, a tuple of tensors, a DataLoader or TaskData, "
                      f"got {type(source).__name__}")


def _held(examples: int) -> str | None:
    return f"{examples} examples" if examples > CALIBRATION_SAMPLES else None


def _inputs_of(batch: Any, takes: int, names: tuple[str, ...]) -> Inputs:
    """One batch's model inputs: all of it when the model takes that many tensors (input_ids and a mask are
    two inputs, not inputs and labels), its leading tensors when it carries one item more (labels, as a
    DataLoader of (x, y) yields); a dict's values at `names`."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        keys = ", ".join(map(repr, batch))
        if len(names) != takes:
            raise BitmixError(f"a calibration batch is a dict ({keys}), but the model's forward does not name its "
                              "inputs; yield tuples of tensors in the forward's order")
        missing = [n for n in names if n not in batch]
        if missing:
            raise BitmixError(f"a calibration batch (a dict of {keys}) has no {missing[0]!r}, an input of the model "
                              f"({', '.join(names)}); key the batches by the forward's argument names")
        batch = [batch[n] for n in names]
    if isinstance(batch, list | tuple) and len(batch) == takes + 1:
        batch = batch[:takes]
    if not (isinstance(batch, list | tuple) and batch and all(isinstance(t, torch.Tensor) for t in batch)):
        raise BitmixError("calibration batches must be tensors or tuples of tensors (the model's inputs, "
                          "optionally followed by labels)")
    return tuple(batch)
