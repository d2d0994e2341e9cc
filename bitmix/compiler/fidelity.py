"""The fidelity guard: does the compiled model still compute what the FP32 model computes?

Every compile runs a few inputs (the calibration inputs when given, else the example
inputs) through the FP32 model and the compiled one and records, for `report.json`'s
`accuracy`, the mean per-example cosine similarity of the outputs (`example_cosine`) and
the largest absolute error relative to the largest FP32 output (`example_max_rel_err`).
Below `MIN_COSINE` it warns once, saying what to try: nothing else tells a user who
compiled without data that the outputs have become unrelated to FP32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from bitmix.errors import BitmixError

# The acceptance bar of issue 17 for minilm; the zoo CNNs reach >= 0.999 at int8.
MIN_COSINE = 0.99
MAX_EXAMPLES = 32  # enough for a stable mean, cheap next to the compile itself


def fidelity(fp32: Callable[..., Any], compiled: Callable[..., Any],
             inputs: tuple[torch.Tensor, ...] | torch.Tensor, limit: int | None = MAX_EXAMPLES) -> dict[str, float]:
    """Mean per-example cosine and max relative error of `compiled` against `fp32` on (the first `limit` of)
    `inputs`."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if limit is not None:
        inputs = tuple(t[:limit] if t.dim() else t for t in inputs)
    with torch.no_grad():
        ref = _leaves(fp32(*inputs))
        out = _leaves(compiled(*inputs))
    cosines, err, scale = [], 0.0, 0.0
    for r, o in zip(ref, out, strict=True):
        r, o = r.double(), o.double()
        rows = r.shape[0] if r.dim() > 1 else 1
        cos = torch.nn.functional.cosine_similarity(o.reshape(rows, -1), r.reshape(rows, -1), dim=1)
        cosines.append(cos)
        err = max(err, float((o - r).abs().max()))
        scale = max(scale, float(r.abs().max()))
    cosine = float(torch.cat(cosines).mean()) if cosines else 1.0
    return {"example_cosine": cosine, "example_max_rel_err": err / scale if scale > 0 else err}


def guard(fp32: Callable[..., Any], compiled: Callable[..., Any], inputs: Any, warn: list[str],
          fallback: tuple[torch.Tensor, ...] | torch.Tensor) -> dict[str, float]:
    """`fidelity` on `inputs` (on `fallback`, the example inputs, if the compiled model does not take
    their shapes, e.g. after a static export), plus one warning when the cosine is below MIN_COSINE.

    The fallback is run whole: a static export takes only the example's own batch size.
    """
    try:
        result = fidelity(fp32, compiled, inputs if inputs is not None else fallback)
    except BitmixError:
        result = fidelity(fp32, compiled, fallback, limit=None)
    if not result["example_cosine"] >= MIN_COSINE:
        msg = (f"the compiled model's outputs are far from FP32 on the example inputs (cosine "
               f"{result['example_cosine']:.4f} < {MIN_COSINE}); try calibration data (data=...), "
               "a wider target (mixed-npu or int8-npu), a higher budget, or fine-tuning (finetune=..., data=...)")
        warnings.warn(msg, stacklevel=3)
        warn.append(msg)
    return result


def _leaves(out: Any) -> list[torch.Tensor]:
    """Floating tensors of an output (tensor, tuple, dict, Hugging Face ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
