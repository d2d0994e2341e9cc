"""Output-aware activation clipping: each layer's activation steps chosen by the layer's output error.

`ranges.activation_range` picks the step that minimises the activation's own quantization MSE.
At 4 bits and below that is not the step a layer wants: what matters is the error of its
output `Q(x) Q(W)^T` (or `Q(a) Q(b)` for an activation x activation matmul), in which a channel
the weights amplify counts more and a clipped outlier may cost less than coarse rounding of
everything else (AdaQuant-style layer-wise output matching; the grid search of AIMET's SQNR
analyzer, reference/quantization.md §2, applied to the layer output). Per layer, in execution
order, the activation steps are rescaled by the factor in `FACTORS` (matmul: both operands on
the grid) that minimises the squared output error on the calibration inputs the already
refined upstream layers produce. A float32 step change: the deployed model does the same
integer work.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.qlayer import LSQQuantizer, QuantLayer, quant_layers

FACTORS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3)
MAX_ROWS = 4096  # rows (tokens) of a linear's input judged per layer
MAX_BATCH = 32  # examples of a matmul's or conv's inputs judged per layer


def _q(v: torch.Tensor, q: LSQQuantizer, factor: float) -> torch.Tensor:
    s = q.step.detach() * factor
    return torch.round(torch.clamp(v / s, -q.q_n, q.q_p)) * s


def _linear_error(layer: QuantLayer, x: torch.Tensor, factor: float, wq: torch.Tensor,
                  target: torch.Tensor) -> float:
    assert layer.a_quant is not None
    return float((F.linear(_q(x, layer.a_quant, factor), wq) - target).pow(2).sum())


def _best_factors(layer: QuantLayer, args: tuple) -> tuple[float, float]:
    """(factor for a_quant, factor for b_quant) with the least output error on `args`."""
    x = args[0].detach().float()
    a_q, b_q = layer.a_quant, layer.b_quant
    assert isinstance(a_q, LSQQuantizer)
    if layer.kind == "matmul":
        assert isinstance(b_q, LSQQuantizer)
        x, y = x[:MAX_BATCH], args[1].detach().float()[:MAX_BATCH]
        target = torch.matmul(x, y)
        errors = {(fa, fb): float((torch.matmul(_q(x, a_q, fa), _q(y, b_q, fb)) - target).pow(2).sum())
                  for fa, fb in itertools.product(FACTORS, FACTORS)}
        return min(errors, key=errors.__getitem__)
    assert layer.weight is not None and isinstance(layer.w_quant, LSQQuantizer)
    if layer.a_scale is not None:
        x = x * layer.a_scale
    w = layer.weight.detach().float()
    wq = layer.w_quant(w).detach()
    if layer.kind == "conv2d":
        x = x[:MAX_BATCH]
        target = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        errors = {f: float((F.conv2d(_q(x, a_q, f), wq, None, layer.stride, layer.padding, layer.dilation,
                                     layer.groups) - target).pow(2).sum()) for f in FACTORS}
        return min(errors, key=errors.__getitem__), 1.0
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
    target = F.linear(rows, w)
    errors = {f: _linear_error(layer, rows, f, wq, target) for f in FACTORS}
    return min(errors, key=errors.__getitem__), 1.0


@torch.no_grad()
def refine_activation_steps(model: nn.Module, calibration: tuple[torch.Tensor, ...],
                            max_bits: int = 4) -> dict[str, tuple[float, float]]:
    """Rescale the activation steps of every quantized layer whose activations have at most `max_bits`
    bits (wider ones lose little to the MSE step); returns the factors chosen per layer."""
    chosen: dict[str, tuple[float, float]] = {}

    def hook(layer: QuantLayer, args: tuple) -> None:
        factors = _best_factors(layer, args)
        chosen[layer.name] = factors
        for q, f in ((layer.a_quant, factors[0]), (layer.b_quant, factors[1])):
            if isinstance(q, LSQQuantizer) and f != 1.0:
                q.set_step(q.step.detach() * f)

    targets = [layer for layer in quant_layers(model).values()
               if layer.bits is not None and layer.bits.a <= max_bits and layer._initialized()]
    handles = [layer.register_forward_pre_hook(hook) for layer in targets]
    try:
        model(*calibration)
    finally:
        for h in handles:
            h.remove()
    return chosen
