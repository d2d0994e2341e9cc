"""SQNR: post-training, label-free sensitivity (Pandey et al. 2023, AIMET AMP phase 1).

For each layer and precision, quantize only that layer (weights and input
activations, LSQ-initialised steps from the calibration set) and measure the model
output against the float output on the calibration inputs. The score is the inverse
linear SQNR, `Σ (y_q - y)² / Σ y²`: quantization noise powers from different layers
add (approximately, for independent noise), which is what the knapsack assumes,
whereas SQNR in dB does not. No labels, no training.
"""

from __future__ import annotations

import copy

import torch

from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import calibration_signs
from bitmix.compiler.rotate import rotate_linears
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.errors import BitmixError


def _flat(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1).float()
    if isinstance(out, list | tuple):
        return torch.cat([_flat(o) for o in out])
    if isinstance(out, dict):
        return torch.cat([_flat(v) for v in out.values()])
    raise BitmixError(f"sqnr cannot read a model output of type {type(out).__name__}; return tensors")


@register("sqnr", needs_calibration=True)
@torch.no_grad()
def sqnr(ctx: ScoreContext, cfg: MethodConfig) -> Scores:
    """Inverse output SQNR per layer and precision, one layer quantized at a time."""
    inputs = ctx.calibration_inputs()
    assert inputs is not None  # registered with needs_calibration: `score` checked
    model = copy.deepcopy(ctx.model)
    layers = quant_layers(model)
    rotate_linears(layers, dict.fromkeys(ctx.free_layers, ctx.target.lowest))  # as deployed below 8-bit inputs
    signs = calibration_signs(model, layers, inputs)
    reference = _flat(model(*inputs))
    power = float(reference.pow(2).sum()) or 1.0
    scores: Scores = {}
    for name in ctx.free_layers:
        layer = layers[name]
        scores[name] = {}
        for bits in ctx.target.choices:
            layer.set_bits(bits, *signs[name])
            scores[name][bits] = float((_flat(model(*inputs)) - reference).pow(2).sum()) / power
        layer.set_bits(None)
    return scores
