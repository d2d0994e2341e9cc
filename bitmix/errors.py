"""User-facing errors: one line that says what was wrong and what to do.

The CLI turns any `BitmixError` into that line on stderr and exit code 2.
"""


class BitmixError(ValueError):
    """A bad input from the user (model, target, budget, config, data)."""
