"""Activation steps chosen by the layer's output error instead of the activation's own.

The MSE step (`bitmix.compiler.ranges.activation_range`) weighs every input channel's error alike; the
layer's output weighs channel j's error by the weights that channel meets, `W[:, j]`. An outlier
channel that meets small weights can be clipped harder, a quiet channel that meets large weights needs
a finer step. As the per-row weight steps of `bitmix.compiler.gptq.search_steps` (and AWQ's clipping
search, Lin et al., arXiv 2306.00978), each quantized linear's per-tensor activation step becomes the
multiple of its MSE step in GRID with the least output error from rounding the activation,
`|(Q(x) - x) W_q^T|^2` on calibration rows, through the weights as quantized (a one-scalar case of
AdaQuant's layer-wise output objective, Hubara et al. 2021, arXiv 2006.10518). Rows that cannot reach the
model's output (`bitmix.compiler.live`) are left out. Layers whose weights are narrower than their
activations (4/8, 2/8) keep the MSE step: there the search was measured to hurt (MiniLM w4a8-npu,
128 calibration sentences, seed 0, with GPTQ: 96.97 % cosine with it, see docs/quality.md), while at
8/8 it helped (MiniLM int8-npu 99.45 -> 99.64 %): the step is judged against round-to-nearest 4-bit
weights that GPTQ then changes. The step is still one float32 per tensor (or per-row fraction), so
the kernels do the same integer work. Layers are set in execution order within one pass, each on the inputs
its already-quantized upstream layers produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.qlayer import LSQQuantizer, QuantLayer, row_max
from bitmix.compiler.screen import screened_argmin

GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))  # 0.5 .. 1.5 times the MSE step
MAX_ROWS = 2048  # calibration rows per layer the step is chosen on


def _rows(x: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """The live rows of a linear's input (all rows without a mask), at most MAX_ROWS of them (seeded)."""
    rows = x[live] if live is not None and live.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
    return rows.float()


@torch.no_grad()
def output_step(x: torch.Tensor, weight: torch.Tensor, quant: LSQQuantizer, grid: tuple[float, ...] = GRID
                ) -> torch.Tensor:
    """The multiple of `quant`'s step in `grid` minimising `|(Q(x) - x) weight^T|^2` over rows `x` (R, K),
    `weight` (C, K) as quantized. With more outputs than inputs (C > K) the error is summed through the
    Gram matrix, `Σ (E G) ∘ E` with G = weight^T weight: R K^2 multiply-adds per candidate, not R K C. With many
    rows the candidates are screened on a quarter of them (`bitmix.compiler.screen`)."""
    base = quant.step.detach().float()
    rows = row_max(x, quant.axis) if quant.axis is not None else None  # per-row steps: `step * max`
    gram = weight.t() @ weight if weight.shape[0] > weight.shape[1] else None

    def error(i: int, sel: slice) -> float:
        v = x[sel]
        step = base * grid[i] * (rows[sel] if rows is not None else 1)
        e = quant.dequantized(v, step).sub_(v)
        return float(F.linear(e, weight).pow(2).sum() if gram is None else ((e @ gram) * e).sum())

    return base * grid[screened_argmin(len(grid), error, x.shape[0])]


@torch.no_grad()
def search_activation_steps(model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...],
                            live: dict[str, torch.Tensor] | None = None) -> int:
    """Set every quantizer's step by a forward pass of `calibration` (MSE steps, `LSQQuantizer.init_range`),
    the activation steps of quantized linears whose weights are at least as wide by `output_step` instead.
    Returns how many steps moved."""
    moved = 0

    def hook(layer: QuantLayer, args: tuple) -> None:
        nonlocal moved
        quant = layer.a_quant
        if not isinstance(quant, LSQQuantizer) or bool(quant.initialized) or layer.w_quant is None:
            return
        assert layer.weight is not None
        x = layer.prepare_input(args[0].detach())
        quant.init_range(x)
        mse = quant.step.detach().clone()
        quant.set_step(output_step(_rows(x, (live or {}).get(layer.name)), layer.w_quant(layer.weight), quant, GRID))
        moved += int(not torch.equal(quant.step, mse))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers.values()
               if layer.kind == "linear" and layer.bits is not None and layer.bits.w >= layer.bits.a]
    try:
        model(*calibration)
    finally:
        for h in handles:
            h.remove()
    return moved
