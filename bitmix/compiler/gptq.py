"""GPTQ: error-compensating weight rounding (Frantar et al., ICLR 2023, arXiv 2210.17323; after OBQ).

Rounding each weight to its nearest code ignores that a layer's inputs are correlated: the output
error of a weight row `d = w_q - w` is `d H d^T` with `H = X^T X` over the layer's calibration inputs.
GPTQ quantizes one input column at a time and spreads its rounding error over the columns not yet
quantized, in proportion to the inverse Hessian (the optimal brain surgeon update), so later columns
cancel what earlier ones got wrong. Only which code each weight takes and each output row's step
(see below) change, so the deployed layer does the same integer work.

The stored weight of a GPTQ'd layer is each column as it was when it was rounded (the compensated
weight): `round(clip(w / step))` of it is exactly the GPTQ code, so the fake-quant forward, `codes`
and the packed kernels all use those codes, and LSQ fine-tuning starts from them with every weight's
position inside its rounding bin kept. Like bias correction, this changes the layer's float function
(`bits=None` no longer gives the original weights). Layers are processed in execution order within one forward
pass, each seeing the inputs its already-rounded upstream layers produce (GPTQ's sequential form).
A layer keeps GPTQ's codes only if they lower its output error on held-out calibration examples
(Hessian fitted on the even examples, judged on the odd ones), then is refitted on all of them.

Each output row's step is chosen too (`search_steps`): the MSE step minimises the weights' own
rounding error, but what matters is the output error left after GPTQ's compensation, `d H d^T`.
Every row is GPTQ'd at each multiple of its MSE step in STEP_GRID on the even examples' Hessian and
keeps the step whose result has the least error on the odd examples' Hessian. Rows are independent
under GPTQ (one shared inverse-Hessian factor, per-row updates), so each row's choice is exact, and every
candidate step of every row goes through one GPTQ pass as an extra row on one factor. This
is the weight-clipping search of AWQ (Lin et al., arXiv 2306.00978: a grid of clipping ratios per
output channel, judged by the layer's output error on calibration tokens) and OmniQuant's learned
weight clipping (Shao et al., arXiv 2308.13137), judged after GPTQ's compensation and on held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.qlayer import LSQQuantizer, QuantLayer
from bitmix.ir.precision import as_precision
from bitmix.kernels.gptq_columns import block_columns

DAMP = 0.01  # lambda: dampening as a fraction of mean(diag H), GPTQ's default (paper §4, "Cholesky reformulation")
BLOCK = 128  # columns per lazy-batch block (GPTQ's B = 128)
GPTQ_MAX_BITS = 8  # weights at this width and above keep round-to-nearest (see gptq_round)
CHUNK = 8  # examples unfolded at a time when a conv's Hessian is accumulated
MAX_STACK = 1 << 23  # weights (rows x columns) per stacked GPTQ pass: 64 MB in float64
STEP_GRID = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)  # row step multiples of the MSE step tried


def _rows(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (N, G, K, L): per example and weight group, K-wide input columns at L positions."""
    if layer.kind == "linear":
        return x.reshape(x.shape[0], 1, -1, x.shape[-1]).transpose(2, 3)
    assert layer.weight is not None
    kh, kw = layer.weight.shape[-2:]
    cols = F.unfold(x, (kh, kw), dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.reshape(x.shape[0], layer.groups, -1, cols.shape[-1])


def hessians(layer: QuantLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H of the even examples, H of the odd examples), each (G, K, K) float64, for the layer input `x`
    exactly as the weights see it (smoothed and quantized)."""
    return hessian(layer, x[0::2]), hessian(layer, x[1::2])


def hessian(layer: QuantLayer, part: torch.Tensor) -> torch.Tensor:
    """H (G, K, K) float64 of the layer inputs `part`: float32 products, summed in float64 per CHUNK examples."""
    h = None
    for i in range(0, part.shape[0], CHUNK):
        r = _rows(layer, part[i : i + CHUNK]).permute(1, 2, 0, 3).flatten(2)  # (G, K, N*L)
        term = torch.bmm(r, r.transpose(1, 2)).double()
        h = term if h is None else h.add_(term)  # in place: the same sums, one K x K array fewer
    assert h is not None
    return h


def dequant(w: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """`round(clip(w / step)) * step` in float32, the forward pass's arithmetic."""
    s = step.float()
    return torch.round(torch.clamp(w.float() / s, -q_n, q_p)) * s


@dataclass(frozen=True)
class Rows:
    """A Hessian `H = X^T X` kept as its rows X (G, M, K) float64, where there are fewer than K of them:
    `d H d^T = |X d^T|^2` costs M K per weight row instead of K^2 (a GPT-2 fc2 layer's step search judged
    9 x 768 rows on a 3072 x 3072 H from 256 held-out tokens: 130 GFLOP in float64, 11 through X; 3.6 -> 0.7 s)."""

    x: torch.Tensor


def held_out(layer: QuantLayer, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor | Rows:
    """What judges rounding on the odd examples of `x`: their `Rows` where there are fewer rows than input
    columns, else their Hessian (`h` if given, as `hessians` gave it)."""
    r = _rows(layer, x[1::2]).permute(1, 2, 0, 3).flatten(2)  # (G, K, M)
    if r.shape[2] < r.shape[1]:
        return Rows(r.transpose(1, 2).double())
    return hessian(layer, x[1::2]) if h is None else h


def row_errors(weight: torch.Tensor, rounded: torch.Tensor, h: torch.Tensor | Rows) -> torch.Tensor:
    """(G, R): each row's `d H d^T`, d = rounded - weight (both (G, R, K)): its squared output error."""
    d = rounded.double().sub_(weight)  # float32 weight widened exactly: `rounded.double() - weight.double()`
    if isinstance(h, Rows):
        return torch.bmm(d, h.x.transpose(1, 2)).pow_(2).sum(dim=-1)
    return torch.bmm(d, h).mul_(d).sum(dim=-1)


def output_error(weight: torch.Tensor, rounded: torch.Tensor, h: torch.Tensor | Rows) -> float:
    """Sum over groups and rows of `d H d^T`, d = rounded - weight (both (G, R, K)): the squared output error."""
    return float(row_errors(weight, rounded, h).sum())


def inverse_factor(h: torch.Tensor, overwrite: bool = False) -> torch.Tensor | None:
    """Upper Cholesky factor of the damped inverse Hessian (G, K, K), or None if H stays singular.

    With P the order reversal and P H P = L L^T, H^-1 = (L^-1 P)^T (L^-1 P) and P L^-1 P is upper
    triangular: the factor is one Cholesky and one triangular inverse (4/3 K^3 flops), not the inverse
    through `cholesky_solve` against I and a second Cholesky of it (8/3 K^3; a GPT-2 fc2 layer's two
    factorizations at K = 3072: 7.0 -> 4.4 s CPU). The same matrix up to rounding (the factor is unique).

    K x K float64 arrays are a large layer's peak (each twice its float32 weight at K = R): the damping goes on
    the diagonal in place and `h` becomes the identity the solve needs, so at most two more than `h` are alive
    here (there were six). `overwrite`: `h` is the caller's to destroy (else it is copied first)."""
    if not overwrite:
        h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0  # an input that is always 0: its column couples to nothing
    mean = diag.mean(dim=-1).reshape(-1, 1)  # of the strided view, as before: a copy's sum rounds otherwise
    undamped = diag.clone()
    h.add_(0.0)  # as adding damp * I did: -0.0 off the diagonal becomes +0.0, all else unchanged
    for damp in (DAMP, 10 * DAMP, 100 * DAMP):
        diag.copy_(undamped).add_(damp * mean)
        chol, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
        if bool((info == 0).all()):
            eye = h.zero_()
            eye.diagonal(dim1=-2, dim2=-1).fill_(1.0)
            inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
            del chol
            return inverse.flip(-2, -1)
        del chol
    return None


@dataclass(frozen=True)
class Factor:
    """One Hessian prepared for GPTQ: its act-order column order (G, K) and the upper Cholesky factor of
    its damped inverse in that order (G, K, K). Computed once per Hessian and shared by every row."""

    order: torch.Tensor | None
    upper: torch.Tensor


def factor(h: torch.Tensor, act_order: bool = True) -> Factor | None:
    """`h` (G, K, K) prepared for `compensate`; None if it cannot be factored. With `act_order` columns go
    in order of decreasing diag(H) (GPTQ's act-order: the most active inputs first, while many columns
    remain to absorb their error); free with one step per output row."""
    order = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True) if act_order else None
    if order is not None:
        h = torch.gather(torch.gather(h, 1, order.unsqueeze(2).expand_as(h)), 2, order.unsqueeze(1).expand_as(h))
    upper = inverse_factor(h, overwrite=order is not None)  # the reordered copy is ours
    return None if upper is None else Factor(order, upper)


@torch.no_grad()
def compensate(weight: torch.Tensor, step: torch.Tensor, f: Factor, q_n: int, q_p: int) -> torch.Tensor:
    """Compensated weights (G, R, K) float32 whose rounding is GPTQ's, for `weight` (G, R, K) and per-row
    `step` (G, R, 1). Works on the transpose (G, K, R), so each column is a contiguous row."""
    order, u = f.order, f.upper
    if order is not None:
        weight = torch.gather(weight, 2, order.unsqueeze(1).expand_as(weight))
    w = weight.transpose(1, 2).double().contiguous()  # (G, K, R)
    del weight  # the reordered copy, if any: not needed beside its float64 transpose
    s = step.float().transpose(1, 2)  # (G, 1, R)
    out = torch.empty(w.shape, dtype=torch.float32)
    k = w.shape[1]
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        block = w[:, i1:i2].clone()
        errors = torch.empty_like(block)
        columns = torch.empty(block.shape, dtype=torch.float32)
        # the column loop, each column's updates of the later ones in the block: one Numba pass (its docstring)
        block_columns(block.numpy(), u[:, i1:i2, i1:i2].contiguous().numpy(), s[:, 0].contiguous().numpy(),
                      q_n, q_p, columns.numpy(), errors.numpy())
        out[:, i1:i2] = columns
        if i2 < k:
            w[:, i2:] -= u[:, i1:i2, i2:].transpose(1, 2) @ errors
    out = out.transpose(1, 2)
    if order is not None:
        out = torch.empty_like(out).scatter_(2, order.unsqueeze(1).expand_as(out), out)
    return out.contiguous()


@torch.no_grad()
def gptq_weights(weight: torch.Tensor, step: torch.Tensor, h: torch.Tensor, q_n: int, q_p: int,
                 act_order: bool = True) -> torch.Tensor | None:
    """Compensated weights (G, R, K) float32 whose rounding is GPTQ's; None if H cannot be factored.

    `weight` (G, R, K), per-row `step` (G, R, 1), `h` (G, K, K); see `factor` for `act_order`."""
    f = factor(h, act_order)
    return None if f is None else compensate(weight, step, f, q_n, q_p)


@torch.no_grad()
def search_steps(weight: torch.Tensor, step: torch.Tensor, fit: torch.Tensor, test: torch.Tensor | Rows, q_n: int,
                 q_p: int, grid: tuple[float, ...] = STEP_GRID) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, the multiple of `step` (G, R, 1) in `grid` whose GPTQ rounding on `fit` leaves the least
    output error on `test`: (steps (G, R, 1) float32, their GPTQ'd weights on `fit`); None if H cannot be
    factored.

    Rows are independent under GPTQ given the Hessian, so every candidate step of every row goes through
    one `compensate` pass as an extra row (chunks of at most MAX_STACK weights) on one shared factor."""
    f = factor(fit)
    if f is None:
        return None
    g, r, k = weight.shape
    per_chunk = max(1, MAX_STACK // max(1, r * k))
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for c0 in range(0, len(grid), per_chunk):
        cs = grid[c0 : c0 + per_chunk]
        s = torch.cat([(step.float() * c).clamp(min=ranges.MIN_STEP) for c in cs], dim=1)  # (G, n*R, 1)
        stacked = weight if len(cs) == 1 else weight.repeat(1, len(cs), 1)
        trial = compensate(stacked, s, f, q_n, q_p)
        err = row_errors(stacked, dequant(trial, s, q_n, q_p), test).reshape(g, len(cs), r)
        del stacked
        s, trial = s.reshape(g, len(cs), r, 1), trial.reshape(g, len(cs), r, k)
        pick = err.argmin(dim=1, keepdim=True)  # first minimum: ties keep the earlier grid point
        cand = (err.gather(1, pick)[:, 0], s.gather(1, pick.unsqueeze(-1))[:, 0],
                trial.gather(1, pick.unsqueeze(-1).expand(g, 1, r, k))[:, 0])
        if best is None:
            best = cand
        else:
            win = cand[0] < best[0]
            best = (torch.where(win, cand[0], best[0]), torch.where(win.unsqueeze(-1), cand[1], best[1]),
                    torch.where(win.unsqueeze(-1), cand[2], best[2]))
        del s, trial, err, pick, cand  # weight-sized: not kept through the next candidate's pass
    assert best is not None
    return best[1], best[2]


def _grouped(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as (G, R, K) and its steps as (G, R, 1)."""
    assert layer.weight is not None and isinstance(layer.w_quant, LSQQuantizer)
    g = layer.groups if layer.kind == "conv2d" else 1
    w = layer.weight.detach().float().reshape(g, layer.weight.shape[0] // g, -1)
    return w, layer.w_quant.step.detach().float().reshape(g, -1, 1)


@torch.no_grad()
def round_layer(layer: QuantLayer, x: torch.Tensor, live: torch.Tensor | None = None) -> bool:
    """GPTQ one layer in place on its input `x` (N, ...), with each row's step from `search_steps`, when that
    lowers the held-out output error below round-to-nearest at the MSE steps.

    `live` (a linear's input rows, `bitmix.compiler.live`) zeroes the rows that cannot reach the model's
    output, which drops them from the Hessians."""
    q = layer.w_quant
    if not isinstance(q, LSQQuantizer) or x.shape[0] < 2:
        return False
    x = layer.prepare_input(x)
    if isinstance(layer.a_quant, LSQQuantizer) and bool(layer.a_quant.initialized):
        x = layer.a_quant(x)
    if live is not None and live.shape == x.shape[:-1]:
        x = x * live.unsqueeze(-1).to(x.dtype)
    x = x.float()
    fit = hessian(layer, x[0::2])
    judge = held_out(layer, x)  # the odd examples' Hessian only where their rows would not do
    w, mse_step = _grouped(layer)
    searched = search_steps(w, mse_step, fit, judge, q.q_n, q.q_p, STEP_GRID)
    if searched is None:
        return False
    step, trial = searched
    rtn = dequant(w, mse_step, q.q_n, q.q_p)
    if output_error(w, dequant(trial, step, q.q_n, q.q_p), judge) >= output_error(w, rtn, judge):
        return False
    del trial, rtn
    test = judge if isinstance(judge, torch.Tensor) else hessian(layer, x[1::2])
    del judge
    f = factor(fit.add_(test))  # in place: fit + test, one K x K array fewer
    del fit, test  # before the GPTQ pass: only the factor is needed there
    if f is None:
        return False
    final = compensate(w, step, f, q.q_n, q.q_p)
    assert layer.weight is not None
    layer.weight.copy_(final.reshape(layer.weight.shape))
    q.set_step(step.reshape(-1))
    return True


@torch.no_grad()
def gptq_round(model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...],
               live: dict[str, torch.Tensor] | None = None) -> list[str]:
    """GPTQ every quantized conv/linear below 8-bit weights (steps set) in execution order, in place.

    At 8 bits round-to-nearest is already within noise of GPTQ (resnet18 int8 PTQ, 8 calibration
    inputs: 1 - cos 3.93e-6 -> 3.81e-6) while the Hessians and the extra pass cost 4-5x the compile
    time, so 8-bit weights keep plain rounding; GPTQ's gains are at 4 bits and below (Frantar et al.).

    `live` masks each linear's input rows that can reach the output (`bitmix.compiler.live.live_rows`).
    Returns the names of the layers that kept GPTQ's codes.
    """
    kept: list[str] = []
    seen: set[str] = set()

    def hook(layer: QuantLayer, args: tuple) -> None:
        if layer.name not in seen:  # a layer called twice is rounded on its first call's inputs
            seen.add(layer.name)
            if round_layer(layer, args[0].detach(), (live or {}).get(layer.name)):
                kept.append(layer.name)

    targets = [layer for layer in layers.values()
               if layer.kind != "matmul" and layer.bits is not None and as_precision(layer.bits).w < GPTQ_MAX_BITS]
    if not targets:
        return kept
    handles = [layer.register_forward_pre_hook(hook) for layer in targets]
    try:
        model(*calibration)
    finally:
        for h in handles:
            h.remove()
    return kept
