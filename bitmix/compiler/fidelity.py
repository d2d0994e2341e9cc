"""The fidelity guard: does the compiled model still compute what the FP32 model computes?

Every compile runs a few inputs (the calibration inputs when given, else the example
inputs) through the FP32 model and the compiled one and records, for `report.json`'s
`accuracy`, which inputs those were (`fidelity_inputs`, `fidelity_examples`, and
`fidelity_in_sample` when they also set the activation ranges: then this checks that the
kernels compute what FP32 computes, not how the model does on unseen data), the cosine
similarity of the outputs (`example_cosine`: per output, the mean over examples of each
example's cosine; the worst output's, so a good output cannot hide a bad one) and the
largest absolute error relative to the largest FP32 output (`example_max_rel_err`).
An output with one value per example (a score, a regression target) is judged as one vector
across the examples; a 0-d output (a mean, a loss) has no direction, so only the relative
error covers it, and integer outputs (argmax) are not compared.
Below `MIN_COSINE` it warns once, saying what to try: nothing else tells a user who
compiled without data that the outputs have become unrelated to FP32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from bitmix.compiler.ranges import examples_of
from bitmix.errors import BitmixError
from bitmix.report.report import fidelity_inputs_text

# The acceptance bar of issue 17 for minilm; the zoo CNNs reach >= 0.999 at int8.
MIN_COSINE = 0.99
MAX_EXAMPLES = 32  # enough for a stable mean, cheap next to the compile itself


def fidelity(fp32: Callable[..., Any], compiled: Callable[..., Any],
             inputs: tuple[torch.Tensor, ...] | torch.Tensor, limit: int | None = MAX_EXAMPLES) -> dict[str, float]:
    """The worst output's mean per-example cosine, and the max relative error, of `compiled` against `fp32`
    on (the first `limit` of) `inputs`."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if limit is not None and examples_of(inputs) is not None:  # examples only along a shared batch dimension
        inputs = tuple(t[:limit] for t in inputs)
    with torch.no_grad():
        ref = _leaves(fp32(*inputs))
        out = _leaves(compiled(*inputs))
    cosines, err, scale = [], 0.0, 0.0
    for r, o in zip(ref, out, strict=True):
        r, o = r.double(), o.double()
        if r.numel() == 0:
            continue
        rows = r.shape[0] if r.dim() > 1 and r[0].numel() > 1 else 1
        if r.numel() > rows:
            cosines.append(float(_row_cosines(o.reshape(rows, -1), r.reshape(rows, -1)).mean()))
        err = _max_with_nan(err, float((o - r).abs().max()))
        scale = max(scale, float(r.abs().max()))
    cosine = min(cosines, key=lambda c: (c == c, c)) if cosines else 1.0  # NaN first: it must warn
    return {"example_cosine": cosine, "example_max_rel_err": err / scale if scale > 0 else err}


def _row_cosines(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-row cosine in float64 without an eps on the norms (F.cosine_similarity clamps each norm at 1e-8,
    which drags outputs of norm ~1e-8 towards 0); rows zero in both match (1), zero in one do not (0)."""
    zero_o, zero_r = (o == 0).all(dim=1), (r == 0).all(dim=1)
    o_unit = o / torch.linalg.vector_norm(o, dim=1, keepdim=True)
    r_unit = r / torch.linalg.vector_norm(r, dim=1, keepdim=True)
    cos = (o_unit * r_unit).sum(dim=1)
    return torch.where(zero_o & zero_r, 1.0, torch.where(zero_o | zero_r, 0.0, cos))


def _max_with_nan(a: float, b: float) -> float:
    """``max`` that keeps a NaN (``max(0.0, nan)`` is 0.0: a NaN output read as no error)."""
    return a if a != a else b if b != b else max(a, b)


def guard(fp32: Callable[..., Any], compiled: Callable[..., Any], inputs: Any, warn: list[str],
          fallback: tuple[torch.Tensor, ...] | torch.Tensor, target: str | None = None,
          full_budget: bool = False, finetuned: bool = False) -> dict[str, Any]:
    """`fidelity` on `inputs`, the calibration inputs (on `fallback`, the example inputs, if there are none
    or the compiled model does not take their shapes, e.g. after a static export), with which inputs those
    were, plus one warning when the cosine is below MIN_COSINE that names only what this compile did not
    already try.

    The fallback is run whole: a static export takes only the example's own batch size. It is in-sample
    only without calibration inputs, when the example inputs set the activation ranges.
    """
    measured, limit = (inputs if inputs is not None else fallback), MAX_EXAMPLES
    try:
        result: dict[str, Any] = fidelity(fp32, compiled, measured, limit)
    except BitmixError:
        measured, limit = fallback, None
        result = fidelity(fp32, compiled, measured, limit)
    n = examples_of((measured,) if isinstance(measured, torch.Tensor) else measured)
    result |= {"fidelity_inputs": "calibration" if measured is inputs else "example",
               "fidelity_examples": None if n is None else min(n, limit or n),
               "fidelity_in_sample": measured is inputs or inputs is None}
    if not result["example_cosine"] >= MIN_COSINE:
        wider = [t for t in ("mixed-npu", "int8-npu") if t != target and not (target == "int8-npu")]
        hints = (["calibration data (data=...)"] if inputs is None else []) + (
            [f"a wider target ({' or '.join(wider)})"] if wider else []) + (
            [] if full_budget else ["a higher budget"]) + (
            [] if finetuned else ["fine-tuning (finetune=..., data=...)"])
        todo = "try " + ", ".join(hints) if hints else "look for layers whose inputs 8 bits cannot cover"
        msg = (f"the compiled model's outputs are far from FP32 on {fidelity_inputs_text(result)} (cosine "
               f"{result['example_cosine']:.4f} < {MIN_COSINE}); {todo}")
        warnings.warn(msg, stacklevel=4)  # this, `pipeline._compile`, `compile`, the caller
        warn.append(msg)
    return result


def _leaves(out: Any) -> list[torch.Tensor]:
    """Floating tensors of an output (tensor, tuple, dict, Hugging Face ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
