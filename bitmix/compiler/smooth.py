"""Per-input-channel scale migration between a linear layer's activations and weights.

A linear layer `y = x W^T` is computed as `y = (x diag(1/s)) (W diag(s))^T`. Two families of `s`:
- where the weights are at least as wide as the activations (8/8, 4/4, 2/2), SmoothQuant's
  (Xiao et al. 2023; reference/quantization.md) `s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)` moves
  activation outliers into the weights, which are quantized per output channel and absorb them;
- where the weights are the narrower operand (4/8, 2/8, 2/4), AWQ's (Lin et al., MLSys 2024,
  arXiv 2306.00978; AutoAWQ's `_search_best_scale`) `s_j = mean|x_j|^alpha`, or its "duo" form
  `mean|x_j|^alpha / mean_i(|W_ij| / max_j|W_ij|)^(1 - alpha)`, alpha on a 20-point grid: the weight
  columns that meet large activations get finer rounding, and the wider activations absorb `1/s`.
`W diag(s)` is folded into the weight; `1/s` multiplies the activation just before its quantization
(`QuantLayer.a_scale`), the same integer work: the kernels' quantize step already scales every value
(x / step), and a post-LN transformer (BERT, MiniLM) has no LayerNorm whose output only feeds linears,
so it cannot be folded.
Each layer keeps the scale (or none) whose quantized output is closest to its float output on
held-out calibration rows (AutoQuant's keep-if-better rule, reference/quantization.md); AWQ's
choice counts only the rows that can reach the model's output (`bitmix.compiler.live`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.qlayer import QuantLayer, qrange
from bitmix.compiler.screen import screened_argmin
from bitmix.ir.precision import Precision, as_precision

ALPHAS = (0.25, 0.5, 0.75)  # SmoothQuant uses 0.5 for most models, up to 0.75-0.85 for larger ones
MAX_ROWS = 4096  # calibration rows (tokens) per layer the choice is made on
SCALE_LIMIT = 1e4
AWQ_GRID = 20  # AutoAWQ's n_grid: alpha = 0, 1/20, ..., 19/20
AWQ_EPS = 1e-4  # AutoAWQ's floor on the duo form's weight term


def _held_out_error(fit: torch.Tensor, test: torch.Tensor, weight: torch.Tensor, bits: Precision, signed: bool,
                    target: torch.Tensor) -> float:
    """Squared output error on `test` rows with the weight MSE-quantized and the activation step set on `fit`."""
    q_n, q_p = qrange(bits.w, True)
    w_step = ranges.weight_steps(weight, q_n, q_p).unsqueeze(1)
    wq = torch.div(weight, w_step).clamp_(-q_n, q_p).round_().mul_(w_step)
    a_signed, a_step = ranges.activation_range(fit, bits.a, signed)
    a_n, a_p = qrange(bits.a, a_signed)
    xq = torch.div(test, a_step).clamp_(-a_n, a_p).round_().mul_(a_step)
    return float((xq @ wq.T).sub_(target).pow_(2).sum())


def _smoothquant_scales(fit: torch.Tensor, weight: torch.Tensor) -> Iterator[torch.Tensor]:
    x_max = fit.abs().amax(dim=0)
    w_max = weight.abs().amax(dim=0).clamp(min=1e-8)
    for alpha in ALPHAS:
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1 / SCALE_LIMIT, SCALE_LIMIT)
        yield torch.where(x_max > 0, s, torch.ones_like(s))


def _awq_scales(fit: torch.Tensor, weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """AutoAWQ's candidates, each normalised to a geometric mean of max and min of 1 (as AutoAWQ does)."""
    x_mean = fit.abs().mean(dim=0)
    w_rel = weight.abs() / weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)  # per output channel
    w_mean = w_rel.mean(dim=0)
    live = x_mean > 0
    if not bool(live.any()):
        return
    for i in range(AWQ_GRID):
        alpha = i / AWQ_GRID
        plain = x_mean.pow(alpha)
        forms = (plain, plain / (w_mean.pow(1 - alpha) + AWQ_EPS)) if i else (1 / (w_mean + AWQ_EPS),)
        for s in forms:
            s = s / (s[live].amax() * s[live].amin()).sqrt()
            s = torch.where(live, s.clamp(1 / SCALE_LIMIT, SCALE_LIMIT), torch.ones_like(s))
            yield s


@torch.no_grad()
def choose_scale(x: torch.Tensor, weight: torch.Tensor, bits: int | Precision, signed: bool) -> torch.Tensor | None:
    """The per-input-channel `s` with the lowest held-out output error for inputs `x` (rows, K), or None if
    no scale beats none. AWQ's candidates where the weights are narrower than the activations, else
    SmoothQuant's.

    Scales and ranges are fitted on half of the rows and judged on the other half: an equalised
    activation has no headroom left in any channel, so judging on the fitting rows favours it.
    With many held-out rows the candidates are screened on a quarter of them (`bitmix.compiler.screen`; MiniLM
    w4a8, 128 calibration sentences: the full search's scale in 48 of 48 layers, smoothing 50 -> 38 CPU s).
    """
    bits = as_precision(bits)
    x, weight = x.float(), weight.detach().float()
    fit, test = x[0::2], x[1::2]
    target = test @ weight.T
    candidates: list[torch.Tensor | None] = [None]
    candidates += _awq_scales(fit, weight) if _weights_narrower(bits) else _smoothquant_scales(fit, weight)

    def error(s: torch.Tensor | None, rows: slice) -> float:
        if s is None:
            return _held_out_error(fit, test[rows], weight, bits, signed, target[rows])
        return _held_out_error(fit / s, test[rows] / s, weight * s, bits, signed, target[rows])

    return candidates[screened_argmin(len(candidates), lambda i, rows: error(candidates[i], rows), test.shape[0])]


def _weights_narrower(bits: int | Precision) -> bool:
    """SmoothQuant's migration moves quantization difficulty from the activations into the weights: not where
    the weights are the narrower operand. MiniLM at 4/8 (GPTQ-rounded weights, 128 calibration sentences):
    97.11 % cosine unsmoothed, 96.24 % with SmoothQuant's scales on the 31 of 34 linears whose own held-out
    output error they lowered. AWQ's scales protect the weights instead."""
    p = as_precision(bits)
    return p.w < p.a


@torch.no_grad()
def smooth_linears(model: nn.Module, layers: dict[str, QuantLayer], assignment: dict[str, int],
                   calibration: tuple[torch.Tensor, ...], signs: dict[str, tuple[bool, bool]],
                   live: dict[str, torch.Tensor] | None = None) -> int:
    """Scale every linear layer in `assignment` where a scale lowers its held-out output error, in place
    (float model, before its steps are set). For AWQ's layers, `live` (from `bitmix.compiler.live.live_rows`)
    drops the rows that cannot reach the output from the statistics and the judgement. SmoothQuant's layers
    keep every row: they are the int8 ones, calibrated on few inputs (8 in the int8 protocol), and on MiniLM
    int8-npu PTQ judging on the live rows of 8 sentences left too few rows for the half/half split
    (99.23 % cosine vs 99.45 %; docs/quality.md).

    Returns how many layers took a scale.
    """
    chosen: dict[str, torch.Tensor] = {}

    def hook(layer: QuantLayer, args: tuple) -> None:
        x = layer.prepare_input(args[0].detach())
        x = x.reshape(-1, x.shape[-1])
        mask = (live or {}).get(layer.name)
        if mask is not None and mask.numel() == x.shape[0] and _weights_narrower(assignment[layer.name]):
            x = x[mask.reshape(-1)]
        if x.shape[0] > MAX_ROWS:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
        assert layer.weight is not None
        signed = signs.get(layer.name, (True, True))[0]
        s = choose_scale(x, layer.weight, assignment[layer.name], signed)
        if s is not None:
            chosen[layer.name] = s

    targets = [layer for name, layer in layers.items() if layer.kind == "linear" and layer.a_scale is None
               and assignment.get(name) is not None]
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
