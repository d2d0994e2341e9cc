"""`Budget`: what a compiled model may cost on the simulated chip, as the user states it.

Either a fraction of the all-highest-choice cost (`Budget(0.8)`; 1.0 = every free layer at
the target's highest precision) or absolute goals (`Budget(fps=5e7)` frames per second,
`Budget(latency_s=1e-4)` for one run of the example's whole batch, `Budget(energy_j=2e-6)` per
frame; several at once all hold). A frame is one item of the batch. `clamp=True`
turns a fraction below the cheapest assignment into the cheapest one (with a warning)
instead of an error; the torch.compile backend uses it so a small graph piece never fails.
The pipeline resolves a Budget against the chip into the allocator's constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitmix.errors import BitmixError

DEFAULT_FRACTION = 0.75  # of the all-highest-choice cost, when compile is given no budget


@dataclass(frozen=True)
class Budget:
    fraction: float | None = None
    fps: float | None = None
    latency_s: float | None = None
    energy_j: float | None = None
    clamp: bool = False

    def __post_init__(self) -> None:
        goals = {k: v for k, v in self.goals().items() if v is not None}
        for key, value in goals.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BitmixError(f"budget {key} must be a number, got {value!r}")
        if self.fraction is not None and self.fraction <= 0:
            raise BitmixError(f"budget must be > 0 (a fraction of the all-highest cost, e.g. 0.75), "
                              f"got {self.fraction}")
        for key in ("fps", "latency_s", "energy_j"):
            if key in goals and goals[key] <= 0:
                raise BitmixError(f"{key} must be a positive number, got {goals[key]!r}")
        if not goals:
            raise BitmixError("budget is empty; give a fraction (e.g. Budget(0.75)) or a goal "
                              "(Budget(fps=...), latency_s=..., energy_j=...)")
        if self.fraction is not None and len(goals) > 1:
            raise BitmixError("give a budget fraction or absolute goals (fps, latency_s, energy_j), not both")

    def goals(self) -> dict[str, float | None]:
        return {"fraction": self.fraction, "fps": self.fps, "latency_s": self.latency_s, "energy_j": self.energy_j}

    @classmethod
    def default(cls, one_choice: bool) -> Budget:
        """What `compile` budgets when given nothing: DEFAULT_FRACTION of the all-highest cost, raised (with a
        warning) to the cheapest assignment where that costs more, e.g. w4a8-npu on a transformer whose
        precision-independent work dominates; all of it for a one-choice target (int8-npu), whose every
        layer's precision is fixed, so there is nothing to budget."""
        return cls(1.0) if one_choice else cls(DEFAULT_FRACTION, clamp=True)

    @classmethod
    def of(cls, value: Budget | float | int | None) -> Budget:
        """A Budget, or a plain number read as the fraction."""
        if isinstance(value, Budget):
            return value
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            raise BitmixError(f"budget must be a number (fraction of the all-highest cost) or a bitmix.Budget, "
                              f"got {value!r}")
        return cls(float(value))
