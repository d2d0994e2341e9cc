"""`uniform` and `random`: allocation baselines exposed under method names.

They use no sensitivity information, so their scores are all zero; the registry
records the allocation strategy (`bitmix.compiler.allocate.uniform` /
`random_feasible`) that `allocate(..., strategy=sensitivity.strategy(method))` runs.
"""

from __future__ import annotations

from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register


def _zeros(ctx: ScoreContext) -> Scores:
    return {name: dict.fromkeys(ctx.target.choices, 0.0) for name in ctx.free_layers}


@register("uniform", strategy="uniform")
def uniform(ctx: ScoreContext, cfg: MethodConfig) -> Scores:
    """The best single precision that fits the budget."""
    return _zeros(ctx)


@register("random", strategy="random")
def random(ctx: ScoreContext, cfg: MethodConfig) -> Scores:
    """A random assignment filling the budget (seeded by the allocation seed)."""
    return _zeros(ctx)
