"""EAGL: entropy of each layer's quantized weight codes (Bablani et al. 2023, arXiv 2301.13330).

For layer l at precision b, the weights are quantized per output channel with a step s,
giving codes q; with p_k = #(q == k) / N_l,

    H_l(b) = -Σ_k p_k log2 p_k   (bits, in [0, b])

Where the step comes from (`EAGLConfig.steps`):

- ``learned`` (default with training data): the paper's regime. The model is first trained at
  the highest choice with LSQ (`bitmix.compiler.pretrain`, cached, shared by every budget);
  H(highest) uses the learned steps on the trained weights, lower precisions the MSE-optimal
  step on the trained weights (the paper's treatment of the lower precision is not known).
- ``mse``: the MSE-optimal step on the FP32 weights, the PTQ range setting itself
  (`LSQQuantizer.init_range`, `bitmix.compiler.ranges`). The documented data-free fallback (no
  training data, e.g. the torch.compile backend).
- ``init``: LSQ's initial step 2<|w|>/sqrt(Q_P) on the FP32 weights (what bitmix shipped
  before; it normalises every layer's distribution to nearly the same shape).

Variants, named ``[neg_]entropy[_drop][_params]`` (choices c_0 > c_1 > ..., scores 0 at c_0):

- ``entropy``: s_l(c_k) = Σ_{i<k} H_l(c_i)   ({4, 2}: s_l(2) = H_l(4));
  ``neg_entropy`` uses the unused bits c_i − H_l(c_i) instead (low entropy = sensitive).
- ``entropy_drop``: s_l(b) = H_l(c_0) − H_l(b) (information lost by requantizing);
  ``neg_entropy_drop``: (c_0 − b) − (H_l(c_0) − H_l(b)).
- ``_params``: times the parameter count N_l (total information rather than per weight).

Default ``entropy_drop`` with learned steps: chosen on digits-cnn and digits-mlp only, by the
Spearman ρ against measured per-layer loss increases (benchmarks/sensitivity.py --ablation,
2026-12-01: ρ +0.14 on digits-cnn's 7 free layers, +1.0 on digits-mlp's 3 layers; every other
variant and step rule lower on average), then reported unchanged on digits-cnn-ptq (ρ +0.39)
and minilm (docs/eagl.md). No ρ there is significant: the learned steps move each layer's H(4)
by < 0.05 bit, and the code entropy sees only the shape of the weight distribution, which is
nearly the same in every layer, while sensitivity on digits-cnn follows depth.

Not checkable against the paper (only its abstract is readable, methods.md §1): the exact
estimator (sign, normalisation by N_l or MACs, entropy vs entropy drop), which step defines
the lower precision's codes, per-tensor vs per-channel steps, the length of the
higher-precision training, and whether activations enter. Matmul layers have no weights:
with calibration inputs their H is the mean entropy of the two operands' codes (per-tensor
steps, the learned ones at the highest choice when trained) and N the elements of the second
operand; without calibration they get the median score of the weighted layers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from bitmix.compiler.qlayer import LSQQuantizer, QuantLayer, quant_layers
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.errors import BitmixError, check_number
from bitmix.ir.graph import Layer
from bitmix.ir.precision import Precision

VARIANTS = tuple(f"{sign}entropy{drop}{params}" for sign in ("", "neg_") for drop in ("", "_drop")
                 for params in ("", "_params"))
STEPS = ("learned", "mse", "init")
DEFAULT_VARIANT = "entropy_drop"


@dataclass(frozen=True)
class EAGLConfig(MethodConfig):
    """EAGL's options. `steps=None`: learned when training data is there, else mse.

    `step_lr_scale`: the LSQ steps' own learning rate while training at the highest choice,
    as a multiple of the recipe's learning rate.
    """

    variant: str = DEFAULT_VARIANT
    steps: str | None = None
    step_lr_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise BitmixError(f"unknown EAGL variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        if self.steps is not None and self.steps not in STEPS:
            raise BitmixError(f"unknown EAGL steps {self.steps!r}; valid: {', '.join(STEPS)}")
        check_number("EAGLConfig.step_lr_scale", self.step_lr_scale)

    def pretrain_step_lr_scale(self) -> float | None:
        return self.step_lr_scale if self.steps in (None, "learned") else None


def entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy (bits) of the empirical distribution of integer codes."""
    flat = codes.reshape(-1).long()
    counts = torch.bincount(flat - flat.min()).double()
    p = counts[counts > 0] / flat.numel()
    return float(-(p * torch.log2(p)).sum())


def _codes(v: torch.Tensor, bits: int, signed: bool, per_channel: bool, steps: str,
           learned: LSQQuantizer | None) -> torch.Tensor:
    """Codes of `v` at `bits` under the chosen step rule."""
    if learned is not None and learned.bits == bits and bool(learned.initialized):
        return learned.codes(v)
    q = LSQQuantizer(bits, signed, v.shape[0] if per_channel else None)
    if steps == "init":
        q.init_step(v)
    else:
        q.init_range(v)
    return q.codes(v)


def weight_entropies(layer: QuantLayer, bits: tuple[Precision, ...], steps: str) -> dict[Precision, float]:
    """H of the weight codes at each choice's weight width (EAGL is a weight-entropy method)."""
    assert layer.weight is not None
    learned = layer.w_quant if steps == "learned" and isinstance(layer.w_quant, LSQQuantizer) else None
    return {b: entropy_bits(_codes(layer.weight.detach(), b.w, True, True, steps, learned)) for b in bits}


def activation_entropies(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None, names: list[str],
                         bits: tuple[Precision, ...], steps: str) -> dict[str, dict[Precision, float]]:
    """Mean operand entropy per matmul layer and precision, from one calibration pass."""
    if inputs is None or not names:
        return {}
    layers = quant_layers(model)
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    hooks = [
        layers[n].register_forward_pre_hook(lambda m, args: seen.setdefault(m.name, tuple(a.detach() for a in args)))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[Precision, float]] = {}
    for name, operands in seen.items():
        layer = layers[name]
        quantizers = (layer.a_quant, layer.b_quant) if steps == "learned" else (None, None)
        out[name] = {}
        for b in bits:
            hs = []
            for v, nonneg, q in zip(operands, (layer.a_nonneg, layer.b_nonneg), quantizers, strict=True):
                signed = q.signed if isinstance(q, LSQQuantizer) else not (nonneg or float(v.min()) >= 0)
                learned = q if isinstance(q, LSQQuantizer) else None
                hs.append(entropy_bits(_codes(v, b.a, signed, False, steps, learned)))
            out[name][b] = sum(hs) / len(hs)
    return out


def scoring_model(ctx: ScoreContext, config: EAGLConfig) -> tuple[nn.Module, str]:
    """(model whose weights and steps define the codes, step rule): trained at the highest choice if possible."""
    steps = config.steps or ("learned" if ctx.pretrained is not None or ctx.data is not None else "mse")
    if steps != "learned":
        return ctx.model, steps
    if ctx.pretrained is not None:
        return ctx.pretrained, steps
    data = ctx.require_data("eagl (learned steps)")
    from bitmix.compiler.pretrain import cached_train_at_highest

    lr = data.recipe.lr * config.step_lr_scale
    return cached_train_at_highest(ctx.model, ctx.graph.names, ctx.target, data, step_lr=lr, seed=ctx.seed).model, steps


def entropies(ctx: ScoreContext, config: EAGLConfig) -> dict[str, dict[Precision, float]]:
    """H_l(b) per free layer and choice (matmuls without calibration left out)."""
    model, steps = scoring_model(ctx, config)
    choices = ctx.target.choices
    layers = quant_layers(model)
    matmuls = [n for n in ctx.free_layers if layers[n].kind == "matmul"]
    out = {n: weight_entropies(layers[n], choices, steps) for n in ctx.free_layers if n not in matmuls}
    out.update(activation_entropies(model, ctx.calibration_inputs(), matmuls, choices, steps))
    return out


def variant_scores(ctx: ScoreContext, h: dict[str, dict[Precision, float]], variant: str) -> Scores:
    """Scores of one variant from the entropies (pure arithmetic: the ablation reuses `h`)."""
    if variant not in VARIANTS:
        raise BitmixError(f"unknown EAGL variant {variant!r}; valid: {', '.join(VARIANTS)}")
    choices, neg = ctx.target.choices, variant.startswith("neg_")
    scores: Scores = {}
    for name, hl in h.items():
        layer = ctx.graph.layer(name)
        n = layer.weight_elements if layer.kind != "matmul" else math.prod(layer.weight_shape)
        if "_drop" in variant:
            raw = {b: hl[choices[0]] - hl[b] for b in choices}
            raw = {b: (_width(layer, choices[0]) - _width(layer, b)) - v for b, v in raw.items()} if neg else raw
        else:
            per = [(_width(layer, c) - hl[c]) if neg else hl[c] for c in choices]
            raw = {c: sum(per[:k]) for k, c in enumerate(choices)}
        scale = float(n) if variant.endswith("_params") else 1.0
        scores[name] = {b: scale * v for b, v in raw.items()}
    free = ctx.free_layers
    missing = [n for n in free if n not in scores]
    if missing:
        if not scores:
            return {n: dict.fromkeys(choices, 0.0) for n in free}
        neutral = {b: statistics.median(s[b] for s in scores.values()) for b in choices}
        scores.update({n: dict(neutral) for n in missing})
    return {n: scores[n] for n in free}


def _width(layer: Layer, p: Precision) -> int:
    """The width whose entropy EAGL measures: the weights', or a matmul's (activation) operands'."""
    return p.a if layer.kind == "matmul" else p.w


def eagl_scores(ctx: ScoreContext, config: EAGLConfig | None = None) -> Scores:
    config = config or EAGLConfig()
    return variant_scores(ctx, entropies(ctx, config), config.variant)


@register("eagl", config=EAGLConfig)
def eagl(ctx: ScoreContext, cfg: EAGLConfig) -> Scores:
    """Entropy scores (variant `cfg.variant`), from learned steps when the model can be trained."""
    return eagl_scores(ctx, cfg)
