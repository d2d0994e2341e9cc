"""User-facing errors: one line that says what was wrong and what to do.

The CLI turns any `BitmixError` into that line on stderr and exit code 2.
"""

import math
import numbers


class BitmixError(ValueError):
    """A bad input from the user (model, target, budget, config, data)."""


class NoQuantizableLayers(BitmixError):
    """The model has no conv2d/linear/matmul for bitmix to quantize (the torch.compile backend runs it eagerly)."""


def check_number(what: str, value: object, minimum: float = 0.0, *, inclusive: bool = False) -> None:
    """Refuse anything but a finite number above `minimum` (or equal to it when `inclusive`): a NaN slips past
    `value <= 0` and a bool passes for 0 or 1, and either fails far from the option that caused it."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < minimum or (value == minimum and not inclusive):
        raise BitmixError(f"{what} must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {value!r}")


def check_count(what: str, value: object, minimum: int = 1) -> None:
    """Refuse anything but an int >= `minimum` (a float count breaks `range`; a bool passes for 0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BitmixError(f"{what} must be an int >= {minimum}, got {value!r}")
