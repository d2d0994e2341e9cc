"""LIMPQ: layer importance from jointly learned per-bit LSQ steps (Tang et al., ECCV 2022).

Every free layer gets one learnable per-tensor step per candidate precision, for its
weights and for its input activations (both operands of a matmul). Each training step
(as in 1hunters/LIMPQ `process.py`) accumulates gradients from every uniform policy
(all free layers at b, for each candidate b) plus one random per-layer policy, clips
gradient values to ±1 and updates; weights train too, pinned layers stay at their bits.
Importance, as in LIMPQ's ILP objective: `I_l(b) = s_act,l(b) + α · s_w,l(b)` with
α = 2 (for matmul the two activation steps); the score is `I_l(b) − I_l(highest)`.
LIMPQ treats a precision whose importance falls below that of a higher one as an
outlier; here scores are made monotone instead (running max towards lower bits).
Switchable BatchNorm is unnecessary: BN is folded before scoring.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from bitmix.compiler.qlayer import _GradScale, _RoundSTE, qrange, quant_layers
from bitmix.compiler.quantize import calibration_signs
from bitmix.compiler.rotate import rotate_linears
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.errors import check_count, check_number

ALPHA = 2.0


@dataclass(frozen=True)
class LIMPQConfig(MethodConfig):
    """Joint multi-precision training: epochs, Adam lr, mini-batch, calibration inputs for the steps."""

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64  # memory grows with it
    calibration_size: int = 64

    def __post_init__(self) -> None:
        check_count("LIMPQConfig.epochs", self.epochs)  # no epoch, no learned step: nothing to rank by
        check_number("LIMPQConfig.lr", self.lr)
        check_count("LIMPQConfig.batch_size", self.batch_size)
        check_count("LIMPQConfig.calibration_size", self.calibration_size)


class MultiStepLSQ(nn.Module):
    """Per-tensor LSQ quantizer holding one learnable step per candidate precision."""

    def __init__(self, bits: tuple[int, ...], signed: bool) -> None:
        super().__init__()
        self.choices = tuple(bits)
        self.signed = signed
        self.active = 0
        self.step = nn.Parameter(torch.ones(len(bits)))
        self.register_buffer("initialized", torch.zeros(len(bits), dtype=torch.bool))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        i = self.active
        q_n, q_p = qrange(self.choices[i], self.signed)
        if not bool(self.initialized[i]):
            with torch.no_grad():
                self.step[i] = (2.0 * v.detach().abs().mean() / math.sqrt(q_p)).clamp(min=1e-8)
                self.initialized[i] = True
        n = v.numel() if v.dim() <= 1 else v[0].numel()
        s = _GradScale.apply(self.step[i], 1.0 / math.sqrt(n * q_p))
        return _RoundSTE.apply(torch.clamp(v / s, -q_n, q_p)) * s


@register("limpq", config=LIMPQConfig, needs_data=True)
def limpq(ctx: ScoreContext, cfg: LIMPQConfig) -> Scores:
    """Learned-step importance after `cfg.epochs` of joint multi-precision training."""
    data = ctx.require_data("limpq")
    choices = ctx.target.choices
    model = copy.deepcopy(ctx.model)
    layers = quant_layers(model)
    rotate_linears(layers, dict.fromkeys(ctx.free_layers, ctx.target.lowest))  # as deployed below 8-bit inputs
    calibration = data.calibration(cfg.calibration_size)
    signs = calibration_signs(model, layers, calibration)
    pinned = ctx.target.pinned(ctx.graph.names)
    for name, bits in pinned.items():
        layers[name].set_bits(bits, *signs[name])
    quantizers: dict[str, list[MultiStepLSQ]] = {}
    for name in ctx.free_layers:
        layer = layers[name]
        layer.set_bits(choices[0], *signs[name])
        a_signed, b_signed = signs[name]
        a_widths, w_widths = tuple(c.a for c in choices), tuple(c.w for c in choices)
        layer.a_quant = MultiStepLSQ(a_widths, a_signed)
        if layer.kind == "matmul":
            layer.b_quant = MultiStepLSQ(a_widths, b_signed)
        else:
            layer.w_quant = MultiStepLSQ(w_widths, signed=True)
        quantizers[name] = [q for q in (layer.a_quant, layer.b_quant, layer.w_quant) if isinstance(q, MultiStepLSQ)]
    with torch.no_grad():
        model(*calibration)  # initialise the pinned layers' activation steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(ctx.seed)
    model.train()
    for epoch in range(cfg.epochs):
        for inputs, targets in data.batches("train", cfg.batch_size, shuffle=True, seed=ctx.seed + epoch):
            opt.zero_grad(set_to_none=True)
            policies = [dict.fromkeys(quantizers, i) for i in range(len(choices))]
            policies.append({n: rng.randrange(len(choices)) for n in quantizers})
            for policy in policies:
                for name, index in policy.items():
                    for q in quantizers[name]:
                        q.active = index
                data.loss(model(*inputs), targets).backward()
            torch.nn.utils.clip_grad_value_(params, 1.0)
            opt.step()
    scores: Scores = {}
    for name, qs in quantizers.items():
        layer = layers[name]
        importance = []
        for i in range(len(choices)):
            if layer.kind == "matmul":
                importance.append(float(qs[0].step[i].detach()) + float(qs[1].step[i].detach()))
            else:
                a_q, w_q = layer.a_quant, layer.w_quant
                assert isinstance(a_q, MultiStepLSQ) and isinstance(w_q, MultiStepLSQ)
                importance.append(float(a_q.step[i].detach()) + ALPHA * float(w_q.step[i].detach()))
        monotone = [max(importance[: i + 1]) for i in range(len(importance))]
        scores[name] = {b: monotone[i] for i, b in enumerate(choices)}
    return scores
