"""Post-training range setting: the step that minimises quantization MSE on the data.

The LSQ initialisation `2 <|v|> / sqrt(Q_P)` is a QAT starting point; at 8 bits it is
~4x coarser than the min-max step on Gaussian weights, which alone cost resnet18 2.4e-3
of output cosine (measured). PTQ toolkits instead search the clipping range: AIMET's
TF-enhanced / SQNR analyzer tries 101 symmetric scales from max/100 to max and keeps the
one with the least quantization + clipping error (reference/quantization.md §2, A-TFE,
A-EA). Here the candidates are `alpha * max|v| / Q_P`, searched coarse (alpha = 1/20 ..
1) then fine (steps of 1/200 around the best), minimising the exact squared error of
`round(clip(v / s)) * s` — per output channel for weights, per tensor for activations.
"""

from __future__ import annotations

import torch

from bitmix.errors import BitmixError

COARSE = 10  # alpha in {1/10, ..., 10/10}
FINE = 10  # then alpha +- 1/20 in steps of 1/100 around the coarse best
MAX_SAMPLES = 1 << 18  # values searched per tensor or weight (the max is taken over all of them)
MIN_STEP = 1e-8


def quant_error(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, midrise: bool = False) -> torch.Tensor:
    """Σ_k (Q(v[r, k]) − v[r, k])² per row of v (R, K), for one step per row (R, 1) or candidates (R, A);
    `midrise`: Q(v) = round(clip((v − s/2) / s)) * s + s/2 (`qlayer.LSQQuantizer`'s mid-rise grid)."""
    from bitmix.kernels.range_search import step_errors

    rows = v.detach().float().reshape(-1, v.shape[-1])
    steps = step.detach().float().reshape(rows.shape[0], -1)
    if midrise:
        half = steps.unsqueeze(2) * 0.5
        q = torch.round(torch.clamp((rows.unsqueeze(1) - half) / steps.unsqueeze(2), -q_n, q_p))
        return (q * steps.unsqueeze(2) + half - rows.unsqueeze(1)).pow(2).sum(dim=2).squeeze(1)
    return torch.from_numpy(step_errors(rows.numpy(), steps.numpy(), q_n, q_p)).squeeze(1)


@torch.no_grad()
def mse_steps(rows: torch.Tensor, q_n: int, q_p: int, midrise: bool = False) -> torch.Tensor:
    """One step per row of `rows` (C, K): argmin over alpha of the squared error at alpha * max|row| / Q_P."""
    v = rows.detach().float()
    top = v.abs().amax(dim=1) if q_n else v.clamp(min=0).amax(dim=1)
    top = top.clamp(min=MIN_STEP * q_p)
    base = (top / q_p).unsqueeze(1)

    def search(alphas: torch.Tensor) -> torch.Tensor:
        errors = quant_error(v, base * alphas, q_n, q_p, midrise)
        return alphas.gather(1, errors.argmin(dim=1, keepdim=True)).squeeze(1)

    coarse = torch.arange(1, COARSE + 1, dtype=torch.float32) / COARSE
    best = search(coarse.expand(v.shape[0], -1))
    offsets = torch.arange(-FINE // 2, FINE // 2 + 1, dtype=torch.float32) / (FINE * COARSE)
    fine = (best.unsqueeze(1) + offsets).clamp(min=1.0 / (COARSE * FINE), max=1.0)
    return base.squeeze(1) * search(fine)


def sample(v: torch.Tensor, limit: int = MAX_SAMPLES) -> torch.Tensor:
    """At most `limit` values of `v` (a fixed-seed random subset, so runs repeat), plus its extremes."""
    flat = v.detach().reshape(-1).float()
    if flat.numel() <= limit:
        return flat
    idx = torch.randint(0, flat.numel(), (limit,), generator=torch.Generator().manual_seed(0))
    return torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])


def weight_steps(weight: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """Per-output-channel MSE steps of a weight (C_out, ...); wide rows are searched on a column subset."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    keep = max(256, MAX_SAMPLES // rows.shape[0])
    if rows.shape[1] > keep:
        cols = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:keep]
        extremes = torch.stack([rows.amin(dim=1), rows.amax(dim=1)], dim=1)
        rows = torch.cat([rows[:, cols], extremes], dim=1)
    return mse_steps(rows, q_n, q_p)


def activation_range(v: torch.Tensor, bits: int, signed: bool) -> tuple[bool, torch.Tensor]:
    """(signed, step) for a whole activation tensor (all calibration examples together).

    A signed tensor is tried both ways: unsigned codes clip its negatives to 0 but spend all
    2^bits levels on the positive side, which wins when the negatives are few and small
    (GELU's minimum is -0.17). The kernels take either kind of code.
    """
    signed, _, step = activation_grid(v, bits, signed, midrise=False)
    return signed, step


def activation_grid(v: torch.Tensor, bits: int, signed: bool, midrise: bool) -> tuple[bool, bool, torch.Tensor]:
    """(signed, mid-rise, step): `activation_range`, with the signed mid-rise grid as a third option if allowed
    (on a unit Gaussian at 2 bits its levels ±0.5, ±1.5 steps give MSE 0.119 against 0.149 on -2..1 steps)."""
    values = sample(v).unsqueeze(0)
    options = [(False, False, 0, 2**bits - 1)]
    if signed:
        options += [(True, False, 2 ** (bits - 1), 2 ** (bits - 1) - 1)]
        options += [(True, True, 2 ** (bits - 1), 2 ** (bits - 1) - 1)] if midrise else []
    best: tuple[float, bool, bool, torch.Tensor] | None = None
    for is_signed, is_midrise, q_n, q_p in options:
        step = mse_steps(values, q_n, q_p, is_midrise)
        error = float(quant_error(values, step, q_n, q_p, is_midrise)[0])
        if best is None or error < best[0]:
            best = (error, is_signed, is_midrise, step[0])
    assert best is not None
    return best[1], best[2], best[3]


def examples_of(inputs: tuple[torch.Tensor, ...]) -> int | None:
    """How many examples `inputs` hold when every one has them along a shared leading dimension, else None:
    a scalar input (a float a graph break passes in), or 1-D ids beside their offsets, cannot be cut."""
    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def check_calibration(calibration: object) -> None:
    """Calibration must be a tuple of finite float tensors, each with examples (or a scalar)."""
    if not isinstance(calibration, tuple) or not all(isinstance(t, torch.Tensor) for t in calibration):
        raise BitmixError("calibration must be a tuple of tensors (one per model input); wrap a tensor as (x,)")
    for i, t in enumerate(calibration):
        if t.dim() and t.shape[0] == 0:
            raise BitmixError(f"calibration input {i} has no examples (shape {tuple(t.shape)}); pass a batch")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BitmixError(f"calibration input {i} contains NaN or Inf; drop or fix those examples")
