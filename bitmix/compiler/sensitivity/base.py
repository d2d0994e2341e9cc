"""The sensitivity contract: `ScoreContext` + a method's own config in, `Scores` out; one registry of methods.

`Scores[layer][p]` estimates how much task quality is lost when `layer` runs at the
`Precision` pair p = (weight bits, activation bits), relative to the target's highest choice
(so it is 0 there); as keys, b/b and the int b are the same. Only non-pinned
layers are scored, over `target.choices`. Scores are additive by assumption; the
knapsack in `bitmix.compiler.allocate` minimises their sum.

A method is one file: a frozen config dataclass (its options, defaults that work) and a
scorer `fn(ctx, config) -> Scores` registered with
`@register("name", config=NameConfig, needs_data=...)`. `ScoreContext` holds only what
every method shares; everything else a method needs lives on its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bitmix.compiler.sensitivity.executor import Executor
from bitmix.errors import BitmixError
from bitmix.ir.graph import LayerGraph
from bitmix.ir.precision import Precision
from bitmix.ir.targets import Target
from bitmix.task import TaskData

Scores = dict[str, dict[Precision, float]]
CALIBRATION_SIZE = 64  # unlabeled inputs taken from the training split when no calibration set is given


@dataclass(frozen=True)
class MethodConfig:
    """Options of a method that has none; a method's own config subclasses it (frozen, with defaults)."""

    def pretrain_step_lr_scale(self) -> float | None:
        """The LSQ steps' learning rate (a multiple of the recipe's) when the method scores a model trained at
        the highest choice first (`compiler/pretrain.py`); None: it scores the float model."""
        return None


@dataclass(frozen=True)
class ScoreContext:
    """What every method may use. `model` is the prepared float GraphModule (`fold.prepare`)."""

    graph: LayerGraph
    target: Target
    model: nn.Module = field(compare=False)
    data: TaskData | None = field(default=None, compare=False)
    calibration: tuple[torch.Tensor, ...] | None = field(default=None, compare=False)
    seed: int = 0
    pretrained: nn.Module | None = field(default=None, compare=False)  # trained at the highest choice (pretrain.py)
    executor: Executor | None = field(default=None, compare=False)  # None: jobs run one after another

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
            return self.data.calibration(CALIBRATION_SIZE)
        return None

    def require_data(self, method: str) -> TaskData:
        if self.data is None:
            check_inputs(METHODS[method], False, True)
        assert self.data is not None
        return self.data


Scorer = Callable[[ScoreContext, MethodConfig], Scores]


@dataclass(frozen=True)
class Method:
    """A registered method: scorer, config type, what data it needs, how the allocator uses its scores."""

    name: str
    fn: Scorer
    config: type[MethodConfig] = MethodConfig
    needs_data: bool = False  # labeled TaskData (methods that train or take gradients)
    needs_calibration: bool = False  # unlabeled inputs at least
    strategy: str = "knapsack"  # "knapsack", or a baseline of bitmix.compiler.allocate ("uniform", "random")
    seeded: bool = True  # False: no random draw or training, so every seed scores the same (`seeded`)


METHODS: dict[str, Method] = {}


def register(name: str, config: type[MethodConfig] = MethodConfig, *, needs_data: bool = False,
             needs_calibration: bool = False, strategy: str = "knapsack", seeded: bool = True
             ) -> Callable[[Scorer], Scorer]:
    """Decorator: make a scorer available as `score(name, ctx)`, `compile(method=name | config)` and the CLI."""
    if config is not MethodConfig:
        taken = [m.name for m in METHODS.values() if m.config is config and m.name != name]
        if taken:
            raise BitmixError(f"config {config.__name__} is already registered for method {taken[0]!r}")

    def wrap(fn: Scorer) -> Scorer:
        METHODS[name] = Method(name, fn, config, needs_data, needs_calibration or needs_data, strategy, seeded)
        return fn

    return wrap


def data_free() -> tuple[str, ...]:
    """Methods that run with neither task data nor calibration inputs (e.g. inside torch.compile)."""
    return tuple(m.name for m in METHODS.values() if not m.needs_calibration)


def label_free() -> tuple[str, ...]:
    """Methods that need no labeled data (calibration inputs at most): what torch.compile's backend can run, as it
    always has the first call's inputs."""
    return tuple(m.name for m in METHODS.values() if not m.needs_data)


def resolve(method: str | MethodConfig) -> tuple[Method, MethodConfig]:
    """A method name (default options) or a config instance → the registered method and its config."""
    if isinstance(method, MethodConfig):
        for m in METHODS.values():
            if type(method) is m.config and m.config is not MethodConfig:
                return m, method
        raise BitmixError(f"{type(method).__name__} is not the config of a registered method; "
                          f"valid methods: {', '.join(sorted(METHODS))}")
    if not isinstance(method, str) or method not in METHODS:
        raise BitmixError(f"unknown sensitivity method {method!r}; valid methods: {', '.join(sorted(METHODS))}")
    m = METHODS[method]
    return m, m.config()


def check_inputs(method: Method, has_data: bool, has_calibration: bool) -> None:
    """Raise the one-line error for a method run without the data it registered as needing."""
    if method.needs_data and not has_data:
        raise BitmixError(
            f"method {method.name!r} needs labelled training data: pass data=bitmix.Data(train=loader) (a DataLoader "
            "of (inputs..., class labels)) or a bitmix.TaskData, or use a method without labels: "
            f"{', '.join(m.name for m in METHODS.values() if not m.needs_data)}"
        )
    if method.needs_calibration and not has_calibration:
        raise BitmixError(f"method {method.name!r} needs unlabeled calibration inputs; pass data= (inputs or a "
                          f"TaskData), or use a data-free method: {', '.join(data_free())}")


def score(method: str | MethodConfig, ctx: ScoreContext) -> Scores:
    """Run a registered method on the data it declares it needs; scores relative to the highest choice.

    A target with one choice (int8-npu, ...) leaves nothing to rank: every score is 0 by definition, so
    the method is not run (EAGL spent 11 s of a MiniLM int8 compile at load ~6 on entropies that cancel)."""
    m, config = resolve(method)
    check_inputs(m, ctx.data is not None, ctx.calibration_inputs() is not None)
    if len(ctx.target.choices) == 1:
        return {name: {ctx.target.highest: 0.0} for name in ctx.free_layers}
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        scores = m.fn(ctx, config)
    return relative_to_highest(scores, ctx.target)


def strategy(method: str | MethodConfig) -> str:
    """How `allocate` should use this method's scores ("knapsack", "uniform" or "random")."""
    return resolve(method)[0].strategy


def seeded(method: str | MethodConfig) -> bool:
    """Whether the method's scores depend on `ScoreContext.seed`; a study scores a seed-free one once for
    every seed (SQNR on MiniLM: ~280 s per seed at load ~4, each seed the same floats)."""
    return resolve(method)[0].seeded


def relative_to_highest(scores: Scores, target: Target) -> Scores:
    """Shift each layer's scores so the highest choice scores exactly 0."""
    top = target.highest
    return {name: {b: float(v[b] - v[top]) for b in target.choices} for name, v in scores.items()}
