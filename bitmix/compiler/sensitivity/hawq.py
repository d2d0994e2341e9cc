"""HAWQ-v3: Hessian-trace-weighted weight perturbation (Yao, Dong et al., ICML 2021).

Per layer `Ω_l(b) = Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²`, with H_l the Hessian of the task
loss w.r.t. the layer's (BN-folded) weights on `examples` training examples, its
trace estimated by Hutchinson's method, `E[vᵀ H v]` over Rademacher v, with one
Hessian-vector product (double backprop) per sample for all layers at once (cross-layer
terms vanish in expectation). `Q_b` is per-channel LSQ-init quantization. Negative
trace estimates (noise, non-convexity) are clamped to 0. Matmul layers have no weights;
they get the median score of the weighted layers. A (w, a) pair is scored at its weight width w:
the method sees no activation error, so pairs that differ only in activation width tie (use
sqnr or alps to score activation widths).

Probe samples are independent jobs on the context's executor: sample i draws its probes
from its own generator (seeded by (seed, i)), and the per-sample terms are summed in
sample order, so the traces do not depend on how samples are split across workers.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from bitmix.compiler.qlayer import LSQQuantizer, quant_layers
from bitmix.compiler.sensitivity.base import MethodConfig, ScoreContext, Scores, register
from bitmix.compiler.sensitivity.executor import SerialExecutor
from bitmix.compiler.transport import PortableModel
from bitmix.errors import check_count
from bitmix.task import TaskData


@dataclass(frozen=True)
class HAWQConfig(MethodConfig):
    """Hutchinson probes per trace and the training examples the Hessian is taken over."""

    samples: int = 16
    examples: int = 256

    def __post_init__(self) -> None:
        check_count("HAWQConfig.samples", self.samples)
        check_count("HAWQConfig.examples", self.examples)


def hutchinson_samples(loss_fn, params: list[torch.Tensor], generators: list[torch.Generator]) -> list[list[float]]:
    """Per probe (one per generator, in order): vᵀHv of each parameter block, Rademacher v."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for generator in generators:
        probes = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
        out.append([float((h * v).sum()) for h, v in zip(hv, probes, strict=True)])
    return out


def _mean_traces(per_sample: list[list[float]], blocks: int) -> list[float]:
    return [sum(s[i] for s in per_sample) / max(1, len(per_sample)) for i in range(blocks)]


def hutchinson_traces(
    loss_fn, params: list[torch.Tensor], samples: int, generator: torch.Generator
) -> list[float]:
    """Tr of each parameter block of the loss Hessian, by Hutchinson with Rademacher probes."""
    return _mean_traces(hutchinson_samples(loss_fn, params, [generator] * samples), len(params))


def probe_generator(seed: int, sample: int) -> torch.Generator:
    """Sample `sample`'s own probe stream (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed % 2**63, sample]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _samples_job(samples: tuple[int, ...], model: PortableModel, names: tuple[str, ...],
                 batch: tuple[tuple[torch.Tensor, ...], torch.Tensor], data: TaskData, seed: int) -> list[list[float]]:
    net = copy.deepcopy(model.module)
    layers = quant_layers(net)
    params = [layers[n].weight for n in names]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        assert p is not None
        p.requires_grad_(True)
    inputs, targets = batch
    generators = [probe_generator(seed, i) for i in samples]
    return hutchinson_samples(lambda: data.loss(net(*inputs), targets), params, generators)  # type: ignore[arg-type]


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
    layers = quant_layers(ctx.model)
    weighted = [n for n in ctx.free_layers if layers[n].kind != "matmul"]
    params = [layers[n].weight for n in weighted]
    executor = ctx.executor or SerialExecutor()
    traces: list[float] = []
    if weighted:
        batch = next(data.batches("train", cfg.examples))
        chunks = [tuple(c.tolist()) for c in np.array_split(np.arange(cfg.samples), executor.workers) if len(c)]
        run = partial(_samples_job, model=PortableModel(ctx.graph, ctx.model), names=tuple(weighted), batch=batch,
                      data=data, seed=ctx.seed)
        done = executor.map(run, chunks, describe=lambda c: f"hawq: probe samples {c[0]}..{c[-1]}", label="hawq")
        traces = _mean_traces([s for chunk in done for s in chunk], len(weighted))
    scores: Scores = {}
    for name, param, trace in zip(weighted, params, traces, strict=True):
        assert param is not None
        per_param = max(trace, 0.0) / param.numel()
        scores[name] = {b: per_param * perturbation(param.detach(), b.w) for b in ctx.target.choices}
    if len(weighted) < len(ctx.free_layers):
        neutral = {
            b: statistics.median(s[b] for s in scores.values()) if scores else 0.0 for b in ctx.target.choices
        }
        scores.update({n: dict(neutral) for n in ctx.free_layers if n not in scores})
    return {n: scores[n] for n in ctx.free_layers}
