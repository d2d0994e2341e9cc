"""Choose among many candidates by an error summed over calibration rows: screen on a subset, judge the best on all.

The AWQ scale search (`bitmix.compiler.smooth`, 40 candidates) and the activation-step search
(`bitmix.compiler.act_search`, 21) each sum an output error over up to thousands of rows per candidate, and that
product was most of their cost. With many rows, a candidate's error on every 4th row ranks it nearly as its error
on all rows do; only the best few are then judged on all, so the choice is the full search's unless the true best
screens outside them (measured on MiniLM: the same choice in every layer, the numbers are in the callers).
"""

from __future__ import annotations

from collections.abc import Callable

EVERY = 4  # the screen judges every 4th row ...
KEEP = 4  # ... and these best-screened candidates are judged on all rows
MIN_ROWS = 512  # with fewer rows every candidate is judged on all of them


def screened_argmin(count: int, error: Callable[[int, slice], float], rows: int) -> int:
    """The index in `range(count)` with the least `error(i, slice(None))` (ties to the lower index) among the KEEP
    candidates with the least `error(i, slice(None, None, EVERY))`; all `count` when `rows` < MIN_ROWS."""
    finalists: list[int] = list(range(count))
    if rows >= MIN_ROWS and count > KEEP:
        screened = [error(i, slice(None, None, EVERY)) for i in finalists]
        finalists = sorted(finalists, key=lambda i: (screened[i], i))[:KEEP]
    errors = {i: error(i, slice(None)) for i in sorted(finalists)}
    return min(errors, key=errors.__getitem__)
