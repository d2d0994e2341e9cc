"""EAGL: entropy of each layer's quantized weight codes, data-free (Bablani et al. 2023).

The paper body is not available (shared/reference/methods.md §1.2), so this is the
estimator as specified there. For layer l at precision b, weights are quantized per
output channel with the LSQ step (the learned one if the layer already runs at b,
else the LSQ init `2 <|w|> / sqrt(Q_P)`), giving codes q; with p_k = #(q == k) / N_l,

    H_l(b) = -Σ_k p_k log2 p_k   (bits, in [0, b])

Variants (choices c_0 > c_1 > ... highest first; scores are 0 at c_0):

- ``entropy``:             s_l(c_k) = Σ_{i<k} H_l(c_i)   ({4, 2}: s_l(2) = H_l(4))
- ``entropy_params``:      N_l · s_l(c_k) of ``entropy`` (total information at the higher precision)
- ``entropy_drop``:        s_l(b) = H_l(c_0) - H_l(b)    (information lost by requantizing)
- ``entropy_drop_params``: N_l · (H_l(c_0) - H_l(b))

Default: ``entropy``. Ablation on digits-cnn (benchmarks/sensitivity.py, 2026-12-01;
int4int2-npu on the default 16x16 chip with digits priced over a 256-frame batch, LSQ QAT
3 epochs with KD, 5 seeds): the four variants rank the 7 free layers identically (layer
sizes grow in the same order as their entropies), so they pick the same layers at budgets
0.75 and 0.85 (top-1 98.78 % at both) and share one Spearman ρ with the ALPS scores
(+0.04). Nothing separates them, so the simplest is kept. An earlier run priced on a
1-core chip did separate them: ρ +0.536 for ``entropy``/``entropy_drop`` vs +0.429 for
the ``*_params`` variants.

Matmul layers have no weights: with calibration inputs their
H is the mean entropy of the two activation operands' codes (per-tensor LSQ init step)
and N the elements of the second operand; without calibration they get the median
score of the weighted layers, so the allocator neither favours nor avoids them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from bitmix.compiler.quantize import LSQQuantizer, QuantLayer, quant_layers
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.errors import BitmixError

VARIANTS = ("entropy", "entropy_params", "entropy_drop", "entropy_drop_params")
DEFAULT_VARIANT = "entropy"


@dataclass(frozen=True)
class EAGLConfig(MethodConfig):
    """Which entropy score (see `VARIANTS` above)."""

    variant: str = DEFAULT_VARIANT


def entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy (bits) of the empirical distribution of integer codes."""
    flat = codes.reshape(-1).long()
    counts = torch.bincount(flat - flat.min()).double()
    p = counts[counts > 0] / flat.numel()
    return float(-(p * torch.log2(p)).sum())


def weight_codes(layer: QuantLayer, bits: int) -> torch.Tensor:
    """The layer's signed per-channel weight codes at `bits` (learned step if available)."""
    assert layer.weight is not None
    q = layer.w_quant
    if not (isinstance(q, LSQQuantizer) and q.bits == bits and bool(q.initialized)):
        q = LSQQuantizer(bits, signed=True, channels=layer.weight.shape[0])
        q.init_step(layer.weight)
    return q.codes(layer.weight.detach())


def activation_entropies(ctx: ScoreContext, names: list[str], bits: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Mean operand entropy per matmul layer and precision, from one float calibration pass."""
    inputs = ctx.calibration_inputs()
    if inputs is None or not names:
        return {}
    layers = quant_layers(ctx.model)
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    hooks = [
        layers[n].register_forward_pre_hook(lambda m, args: seen.setdefault(m.name, tuple(a.detach() for a in args)))
        for n in names
    ]
    try:
        with torch.no_grad():
            ctx.model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[int, float]] = {}
    for name, operands in seen.items():
        layer = layers[name]
        out[name] = {}
        for b in bits:
            hs = []
            for v, nonneg in zip(operands, (layer.a_nonneg, layer.b_nonneg), strict=True):
                q = LSQQuantizer(b, signed=not (nonneg or float(v.min()) >= 0))
                q.init_step(v)
                hs.append(entropy_bits(q.codes(v)))
            out[name][b] = sum(hs) / len(hs)
    return out


def eagl_scores(ctx: ScoreContext, variant: str = DEFAULT_VARIANT) -> Scores:
    if variant not in VARIANTS:
        raise BitmixError(f"unknown EAGL variant {variant!r}; valid: {', '.join(VARIANTS)}")
    choices = ctx.target.choices
    layers = quant_layers(ctx.model)
    free = ctx.free_layers
    matmuls = [n for n in free if layers[n].kind == "matmul"]
    entropies = {n: {b: entropy_bits(weight_codes(layers[n], b)) for b in choices} for n in free if n not in matmuls}
    entropies.update(activation_entropies(ctx, matmuls, choices))
    scores: Scores = {}
    for name, h in entropies.items():
        layer = ctx.graph.layer(name)
        n = layer.weight_elements if layer.kind != "matmul" else math.prod(layer.weight_shape)
        if variant.startswith("entropy_drop"):
            raw = {b: h[choices[0]] - h[b] for b in choices}
        else:
            raw = {c: sum(h[choices[i]] for i in range(k)) for k, c in enumerate(choices)}
        scale = float(n) if variant.endswith("params") else 1.0
        scores[name] = {b: scale * v for b, v in raw.items()}
    missing = [n for n in free if n not in scores]
    if missing:
        if not scores:
            return {n: dict.fromkeys(choices, 0.0) for n in free}
        neutral = {b: statistics.median(s[b] for s in scores.values()) for b in choices}
        scores.update({n: dict(neutral) for n in missing})
    return {n: scores[n] for n in free}


@register("eagl", config=EAGLConfig)
def eagl(ctx: ScoreContext, cfg: EAGLConfig) -> Scores:
    """Data-free entropy scores (variant `cfg.variant`)."""
    return eagl_scores(ctx, cfg.variant)
