"""User-facing errors: one line that says what was wrong and what to do.

The CLI turns any `BitmixError` into that line on stderr and exit code 2.
"""


class BitmixError(ValueError):
    """A bad input from the user (model, target, budget, config, data)."""


class NoQuantizableLayers(BitmixError):
    """The model has no conv2d/linear/matmul for bitmix to quantize (the torch.compile backend runs it eagerly)."""
