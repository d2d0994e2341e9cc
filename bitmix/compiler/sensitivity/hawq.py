"""HAWQ-v3: Hessian-trace-weighted weight perturbation (Yao, Dong et al., ICML 2021).

Per layer `Ω_l(b) = Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²`, with H_l the Hessian of the task
loss w.r.t. the layer's (BN-folded) weights on `examples` training examples, its
trace estimated by Hutchinson's method, `E[vᵀ H v]` over Rademacher v, with one
Hessian-vector product (double backprop) per sample for all layers at once (cross-layer
terms vanish in expectation). `Q_b` is per-channel LSQ-init quantization. Negative
trace estimates (noise, non-convexity) are clamped to 0. Matmul layers have no weights;
they get the median score of the weighted layers.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from bitmix.compiler.quantize import LSQQuantizer, quant_layers
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register


@dataclass(frozen=True)
class HAWQConfig(MethodConfig):
    """Hutchinson probes per trace and the training examples the Hessian is taken over."""

    samples: int = 16
    examples: int = 256


def hutchinson_traces(
    loss_fn, params: list[torch.Tensor], samples: int, generator: torch.Generator
) -> list[float]:
    """Tr of each parameter block of the loss Hessian, by Hutchinson with Rademacher probes."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    totals = [0.0] * len(params)
    for _ in range(samples):
        probes = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
        for i, (h, v) in enumerate(zip(hv, probes, strict=True)):
            totals[i] += float((h * v).sum())
    return [t / max(1, samples) for t in totals]


def perturbation(weight: torch.Tensor, bits: int) -> float:
    """‖Q_b(W) − W‖² with per-channel LSQ-init steps."""
    q = LSQQuantizer(bits, signed=True, channels=weight.shape[0])
    q.init_step(weight)
    with torch.no_grad():
        return float((q(weight) - weight).pow(2).sum())


@register("hawq", config=HAWQConfig, needs_data=True)
def hawq(ctx: ScoreContext, cfg: HAWQConfig) -> Scores:
    """Tr(H)/n · ‖ΔW‖² per layer and precision."""
    data = ctx.require_data("hawq")
    model = copy.deepcopy(ctx.model)
    layers = quant_layers(model)
    weighted = [n for n in ctx.free_layers if layers[n].kind != "matmul"]
    params = [layers[n].weight for n in weighted]
    inputs, targets = next(data.batches("train", cfg.examples))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        assert p is not None
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(ctx.seed)
    traces = hutchinson_traces(lambda: data.loss(model(*inputs), targets), params, cfg.samples, generator)
    scores: Scores = {}
    for name, param, trace in zip(weighted, params, traces, strict=True):
        assert param is not None
        per_param = max(trace, 0.0) / param.numel()
        scores[name] = {b: per_param * perturbation(param.detach(), b) for b in ctx.target.choices}
    if len(weighted) < len(ctx.free_layers):
        neutral = {
            b: statistics.median(s[b] for s in scores.values()) if scores else 0.0 for b in ctx.target.choices
        }
        scores.update({n: dict(neutral) for n in ctx.free_layers if n not in scores})
    return {n: scores[n] for n in ctx.free_layers}
