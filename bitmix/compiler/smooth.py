"""Activation-outlier smoothing (SmoothQuant, Xiao et al. 2023; reference/quantization.md).

A linear layer `y = x W^T` is computed as `y = (x diag(1/s)) (W diag(s))^T`: a per-input-channel
scale `s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)` moves activation outliers into the weights,
which are quantized per output channel and absorb them. `W diag(s)` is folded into the weight;
`1/s` multiplies the activation just before its quantization (`QuantLayer.a_scale`), the same
integer work: the kernels' quantize step already scales every value (x / step), and a post-LN
transformer (BERT, MiniLM) has no LayerNorm whose output only feeds linears, so it cannot be folded.
Each layer keeps the alpha (or no smoothing) whose quantized output is closest to its float
output on the calibration activations (AutoQuant's keep-if-better rule, reference/quantization.md).
"""

from __future__ import annotations

import torch
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.qlayer import QuantLayer, qrange
from bitmix.ir.precision import Precision, as_precision

ALPHAS = (0.25, 0.5, 0.75)  # SmoothQuant uses 0.5 for most models, up to 0.75-0.85 for larger ones
MAX_ROWS = 4096  # calibration rows (tokens) per layer the choice is made on
SCALE_LIMIT = 1e4


def _held_out_error(fit: torch.Tensor, test: torch.Tensor, weight: torch.Tensor, bits: Precision, signed: bool,
                    target: torch.Tensor) -> float:
    """Squared output error on `test` rows with the weight MSE-quantized and the activation step set on `fit`."""
    q_n, q_p = qrange(bits.w, True)
    w_step = ranges.weight_steps(weight, q_n, q_p).unsqueeze(1)
    wq = torch.round(torch.clamp(weight / w_step, -q_n, q_p)) * w_step
    a_signed, a_step = ranges.activation_range(fit, bits.a, signed)
    a_n, a_p = qrange(bits.a, a_signed)
    xq = torch.round(torch.clamp(test / a_step, -a_n, a_p)) * a_step
    return float((xq @ wq.T - target).pow(2).sum())


@torch.no_grad()
def choose_scale(x: torch.Tensor, weight: torch.Tensor, bits: int | Precision, signed: bool) -> torch.Tensor | None:
    """The per-input-channel `s` of the best alpha for inputs `x` (rows, K), or None if no smoothing wins.

    Scales and ranges are fitted on half of the rows and judged on the other half: an equalised
    activation has no headroom left in any channel, so judging on the fitting rows favours it.
    """
    bits = as_precision(bits)
    x, weight = x.float(), weight.detach().float()
    fit, test = x[0::2], x[1::2]
    target = test @ weight.T
    x_max = fit.abs().amax(dim=0)
    w_max = weight.abs().amax(dim=0).clamp(min=1e-8)
    best, best_s = _held_out_error(fit, test, weight, bits, signed, target), None
    for alpha in ALPHAS:
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1 / SCALE_LIMIT, SCALE_LIMIT)
        s = torch.where(x_max > 0, s, torch.ones_like(s))
        error = _held_out_error(fit / s, test / s, weight * s, bits, signed, target)
        if error < best:
            best, best_s = error, s
    return best_s


def _weights_narrower(bits: int | Precision) -> bool:
    """Smoothing moves quantization difficulty from the activations into the weights: not where the weights
    are the narrower operand. MiniLM at 4/8 (GPTQ-rounded weights, 128 calibration sentences): 97.11 %
    cosine unsmoothed, 96.24 % smoothing the 31 of 34 linears whose own held-out output error it lowered
    (even judged with GPTQ-rounded weights on the live rows): the per-layer judgement misses the cost."""
    p = as_precision(bits)
    return p.w < p.a


@torch.no_grad()
def smooth_linears(model: nn.Module, layers: dict[str, QuantLayer], assignment: dict[str, int],
                   calibration: tuple[torch.Tensor, ...], signs: dict[str, tuple[bool, bool]]) -> int:
    """Smooth every linear layer in `assignment` whose weights are not narrower than its activations, in place
    (float model, before its steps are set).

    Returns how many layers took a scale.
    """
    chosen: dict[str, torch.Tensor] = {}

    def hook(layer: QuantLayer, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        if x.shape[0] > MAX_ROWS:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
        assert layer.weight is not None
        signed = signs.get(layer.name, (True, True))[0]
        s = choose_scale(x, layer.weight, assignment[layer.name], signed)
        if s is not None:
            chosen[layer.name] = s

    targets = [layer for name, layer in layers.items() if layer.kind == "linear" and layer.a_scale is None
               and assignment.get(name) is not None and not _weights_narrower(assignment[name])]
    handles = [layer.register_forward_pre_hook(hook) for layer in targets]
    saved = {name: layer.bits for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.bits = None
        model(*calibration)
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.bits = saved[name]
    for name, s in chosen.items():
        layer = layers[name]
        assert layer.weight is not None
        layer.weight.mul_(s.to(layer.weight.dtype))
        layer.a_scale = (1.0 / s).to(torch.float32)
    return len(chosen)
