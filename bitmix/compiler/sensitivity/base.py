"""The sensitivity contract: `ScoreContext` in, `Scores` out, one registry of methods.

`Scores[layer][bits]` estimates how much task quality is lost when `layer` runs at
`bits`, relative to the target's highest choice (so it is 0 there). Only non-pinned
layers are scored, over `target.choices`. Scores are additive by assumption; the
knapsack in `bitmix.compiler.allocate` minimises their sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bitmix.compiler.sensitivity.executor import Executor
from bitmix.errors import BitmixError
from bitmix.ir.graph import LayerGraph
from bitmix.ir.targets import Target
from bitmix.task import TaskData

Scores = dict[str, dict[int, float]]


@dataclass(frozen=True)
class ScoreContext:
    """Everything a method may use. `model` is the prepared float GraphModule (`fold.prepare`)."""

    graph: LayerGraph
    target: Target
    model: nn.Module = field(compare=False)
    data: TaskData | None = field(default=None, compare=False)
    calibration: tuple[torch.Tensor, ...] | None = field(default=None, compare=False)
    seed: int = 0
    calibration_size: int = 64
    eagl_variant: str = "entropy_drop"
    pretrained: nn.Module | None = field(default=None, compare=False)  # trained at the highest choice (pretrain.py)
    alps_epochs: float = 1.0
    alps_base_epochs: int = 1
    alps_lr: float = 1e-4
    alps_metric: str = "loss"
    hawq_samples: int = 16
    hawq_examples: int = 256
    limpq_epochs: int = 2
    limpq_lr: float = 1e-3
    batch_size: int = 64  # mini-batch of the data-driven methods' training (ALPS, LIMPQ); memory grows with it
    workers: int = 1
    executor: Executor | None = field(default=None, compare=False)

    @property
    def free_layers(self) -> tuple[str, ...]:
        """Layers the allocator chooses for (the target's pinned ones excluded)."""
        pinned = self.target.pinned(self.graph.names)
        return tuple(n for n in self.graph.names if n not in pinned)

    def calibration_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """Unlabeled inputs: the explicit calibration set, else the first training inputs."""
        if self.calibration is not None:
            return self.calibration
        if self.data is not None:
            return self.data.calibration(self.calibration_size)
        return None

    def require_data(self, method: str) -> TaskData:
        if self.data is None:
            raise BitmixError(
                f"method {method!r} needs task data (a TaskData with a train split); "
                "pass data, or use a data-free method: eagl, or sqnr with calibration inputs"
            )
        return self.data


@dataclass(frozen=True)
class Method:
    """A registered method: its scorer and the allocation strategy that consumes the scores."""

    name: str
    fn: Callable[[ScoreContext], Scores]
    strategy: str = "knapsack"  # "knapsack", or a baseline of bitmix.compiler.allocate


METHODS: dict[str, Method] = {}


def register(name: str, strategy: str = "knapsack") -> Callable[[Callable[[ScoreContext], Scores]], Callable]:
    """Decorator: make a scorer available as `score(name, ctx)` and `bitmix compile --method name`."""

    def wrap(fn: Callable[[ScoreContext], Scores]) -> Callable[[ScoreContext], Scores]:
        METHODS[name] = Method(name, fn, strategy)
        return fn

    return wrap


def score(method: str, ctx: ScoreContext) -> Scores:
    """Run a registered method; check the result covers every free layer and choice."""
    if method not in METHODS:
        raise BitmixError(f"unknown sensitivity method {method!r}; valid methods: {', '.join(sorted(METHODS))}")
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        scores = METHODS[method].fn(ctx)
    return relative_to_highest(scores, ctx.target)


def strategy(method: str) -> str:
    """How `allocate` should use this method's scores ("knapsack", "uniform" or "random")."""
    if method not in METHODS:
        raise BitmixError(f"unknown sensitivity method {method!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].strategy


def relative_to_highest(scores: Scores, target: Target) -> Scores:
    """Shift each layer's scores so the highest choice scores exactly 0."""
    top = target.highest
    return {name: {b: float(v[b] - v[top]) for b in target.choices} for name, v in scores.items()}
