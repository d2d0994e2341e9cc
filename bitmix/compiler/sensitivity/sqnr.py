"""SQNR: post-training, label-free sensitivity (Pandey et al. 2023, AIMET AMP phase 1).

For each layer and precision, quantize only that layer and measure the model output against
the float output on the calibration inputs. The score is the inverse linear SQNR,
`Σ (y_q - y)² / Σ y²`: quantization noise powers from different layers add (approximately, for
independent noise), which is what the knapsack assumes, whereas SQNR in dB does not. No labels,
no training.

`SQNRConfig.quantizer` says how the one layer is quantized:
- "lsq-init": weights and input activations at their LSQ-initialised steps from the calibration set, every
  linear rotated as the target's lowest choice deploys it (on `mixed-npu` that includes the 8-bit-activation
  choices, which deploy unrotated; scored unrotated, LSQ-initialised 2-bit weights lose so much more than the
  MSE-searched, GPTQ-rounded deployed ones that digits-mlp's 2/8 summed error would exceed its 2/4's, 0.147 vs
  0.097, against the deployed 0.0072 vs 0.0095); on a target offering both 4/8 and 4/8r it scores them alike:
  use "deployed" there;
- "deployed": as `fake_quantize` deploys it (MSE range search, activation-step search, GPTQ rounding,
  bias correction, the rotation), fitted once per choice with every free layer at that choice, then
  each layer scored alone with the float model around it. AIMET AMP scores each candidate with the
  quantizer it deploys (its QuantSim with calibrated encodings, `reference/quantization.md` §1). The
  scale migrations that reach into a neighbouring module (smoothing into a LayerNorm, conv pair
  equalisation) are left out: a layer could not be scored alone with them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bitmix.compiler.qlayer import QuantLayer, quant_layers
from bitmix.compiler.quantize import calibration_signs, fake_quantize
from bitmix.compiler.rotate import rotate_linears
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.errors import BitmixError

QUANTIZERS = ("lsq-init", "deployed")


@dataclass(frozen=True)
class SQNRConfig(MethodConfig):
    """SQNR options: how the one quantized layer is quantized (module docstring)."""

    quantizer: str = "lsq-init"

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise BitmixError(f"unknown SQNR quantizer {self.quantizer!r}; valid: {', '.join(QUANTIZERS)}")


def _flat(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1).float()
    if isinstance(out, list | tuple):
        return torch.cat([_flat(o) for o in out])
    if isinstance(out, dict):
        return torch.cat([_flat(v) for v in out.values()])
    raise BitmixError(f"sqnr cannot read a model output of type {type(out).__name__}; return tensors")


@register("sqnr", SQNRConfig, needs_calibration=True, seeded=False)
@torch.no_grad()
def sqnr(ctx: ScoreContext, cfg: SQNRConfig) -> Scores:
    """Inverse output SQNR per layer and precision, one layer quantized at a time."""
    inputs = ctx.calibration_inputs()
    assert inputs is not None  # registered with needs_calibration: `score` checked
    if cfg.quantizer == "deployed":
        return _deployed(ctx, inputs)
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


def _deployed(ctx: ScoreContext, inputs: tuple[torch.Tensor, ...]) -> Scores:
    """`sqnr` with each layer as `fake_quantize` deploys it at each choice, in an otherwise float model."""
    model = copy.deepcopy(ctx.model)
    reference = _flat(model(*inputs))
    power = float(reference.pow(2).sum()) or 1.0
    fitted = {bits: quant_layers(fake_quantize(ctx.model, dict.fromkeys(ctx.free_layers, bits), inputs,
                                               smoothing=False, equalization=False))
              for bits in ctx.target.choices}
    paths = _paths(model)
    scores: Scores = {}
    for name in ctx.free_layers:
        own = model.get_submodule(paths[name])
        scores[name] = {}
        for bits in ctx.target.choices:
            model.set_submodule(paths[name], fitted[bits][name])
            scores[name][bits] = float((_flat(model(*inputs)) - reference).pow(2).sum()) / power
        model.set_submodule(paths[name], own)
    return scores


def _paths(model: nn.Module) -> dict[str, str]:
    """Each quantizable layer's name -> its module path in `model`."""
    return {m.name: path for path, m in model.named_modules() if isinstance(m, QuantLayer)}
