"""The exact cost of the assignments that split the same way over chips, as one MILP (`solve_split`).

Over several chips `CostModel.evaluate` packs the layers greedily into chips; a chip's run, the pipeline's
period (its slowest chip), PCIe and the idle chips' static power make the cost no sum of per-layer terms.
With the split fixed (the layers that start a chip) it is linear in the choices, in pairs of consecutive
choices and in a few continuous variables: a chip's run is Σ of its terms plus max(its last layer's body, its
first layer's prefetch) (two rows where one run is capped, a variable above both where runs are summed); the
period is a variable above every run and transfer, and the energy is linear in it (the static joules of a
chip's overlapped cycles and of its idle time add up to the period's). Rows saying that each chip holds its
layers and that greedy packing closes it before the next chip's first layer (with that layer's activations
standing in for the largest of the chip's) make every answer split this way, so its cost here is `evaluate`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bitmix.ir.cost import CostModel

Expr = dict[int, float]  # variable index -> coefficient


def split_of(model: CostModel, choice: Sequence[int]) -> tuple[int, ...]:
    """The layers that start a chip when `choice` is packed (`CostModel.stages`)."""
    return tuple(st.start for st in model.stages(choice))


def possible(model: CostModel, starts: tuple[int, ...]) -> bool:
    """Whether some assignment might pack this way: each chip holds its layers at their smallest, and at their
    largest greedy packing would close it before the next chip's first layer (the rows of `solve_split`)."""
    chip, n = model.chip, len(model)
    for start, stop in zip(starts, (*starts[1:], n), strict=True):
        room = chip.sram_bytes - chip.program_bytes * (stop - start)
        if sum(int(w.min()) for w in model.weight_bytes[start:stop]) + max(
                int(a.min()) for a in model.act_bytes[start:stop]) > room:
            return False
        if stop < n and sum(int(w.max()) for w in model.weight_bytes[start:stop]) + int(
                (model.weight_bytes[stop] + np.maximum(model.act_bytes[stop], _least_act(model, start, stop))).max()
        ) < room - chip.program_bytes + 1:
            return False
    return True


def _least_act(model: CostModel, start: int, stop: int) -> int:
    """The activation bytes that the largest of layers start..stop (the next chip's first included) take at least."""
    return max(int(model.act_bytes[i].min()) for i in range(start, stop + 1))


def neighbours(model: CostModel, starts: tuple[int, ...], most: float) -> list[tuple[int, ...]]:
    """Possible splits one step away: a chip boundary moved by one layer, two chips merged, or one chip halved."""
    n = len(model)
    out = []
    for k in range(1, len(starts)):
        for step in (-1, 1):
            moved = starts[k] + step
            if starts[k - 1] < moved < (starts[k + 1] if k + 1 < len(starts) else n):
                out.append((*starts[:k], moved, *starts[k + 1:]))
        out.append(starts[:k] + starts[k + 1:])
    if len(starts) < most:
        for k, (a, b) in enumerate(zip(starts, (*starts[1:], n), strict=True)):
            if b - a > 1:
                out.append((*starts[:k + 1], (a + b) // 2, *starts[k + 1:]))
    return [split for split in out if possible(model, split)]


def solve_split(model: CostModel, scores: Sequence[np.ndarray], starts: tuple[int, ...], caps: dict[str, float],
                node_limit: int | None = None) -> list[int] | None:
    """min Σ score over the assignments that pack into chips starting at `starts` and meet `caps` (per frame:
    cycles, energy_j, sram_bytes, period_s of a run, chips), or None when HiGHS finds none within `node_limit`
    branch-and-bound nodes (a limit on work, not seconds: the answer does not depend on the machine's load)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, chip, f, frames = len(model), model.chip, model.chip.clock_hz, model.frames
    if len(starts) > caps.get("chips", np.inf):
        return None
    stops = (*starts[1:], n)
    ks = [len(c) for c in model.choices]
    xoff = [0, *np.cumsum(ks).tolist()]
    yoff, nv = {}, xoff[-1]
    for i in range(1, n):
        if i not in starts:  # the pair (i - 1, i) shares a chip
            yoff[i], nv = nv, nv + ks[i - 1] * ks[i]
    zoff, period = nv, nv + len(starts)
    nv = period + 1
    rows: list[tuple[Expr, float, float]] = []

    def unary(i: int, values: np.ndarray) -> Expr:
        return {xoff[i] + j: float(v) for j, v in enumerate(values)}

    def pair(i: int, table: np.ndarray) -> Expr:
        return {yoff[i] + p * ks[i] + j: float(v) for (p, j), v in np.ndenumerate(table)}

    def plus(*exprs: Expr, scale: float = 1.0) -> Expr:
        out: Expr = {}
        for e in exprs:
            for k, v in e.items():
                out[k] = out.get(k, 0.0) + v * scale
        return out

    for i in range(n):
        rows.append((unary(i, np.ones(ks[i])), 1.0, 1.0))
    for i, off in yoff.items():  # y[i, p, j] = x[i-1, p] x[i, j] once x is integral
        for p in range(ks[i - 1]):
            rows.append(({**{off + p * ks[i] + j: 1.0 for j in range(ks[i])}, xoff[i - 1] + p: -1.0}, 0.0, 0.0))
        for j in range(ks[i]):
            rows.append(({**{off + p * ks[i] + j: 1.0 for p in range(ks[i - 1])}, xoff[i] + j: -1.0}, 0.0, 0.0))
    static = chip.static_power_w / f
    runs, tails, dynamic, transfers, pcie_j = [], [], [], [], []
    for k, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        inner = range(start + 1, stop)
        runs.append(plus(unary(start, model.fresh[start]),
                         *(pair(i, model.enter[i] + model.hold[i - 1]) for i in inner)))
        tails.append((unary(stop - 1, model.core[stop - 1]), unary(start, model.prefetch[start])))
        dynamic.append(plus(unary(start, model.fresh_j[start] - static * model.fresh[start]),
                            *(pair(i, model.enter_j[i] - static * model.enter[i]) for i in inner)))
        if k:
            nbytes = model.xfer_bytes[start]
            transfers.append(unary(start, np.array([chip.transfer_s(int(b)) for b in nbytes])))
            pcie_j.append(unary(start, nbytes * chip.pcie_j_per_byte))
        weights = plus(*(unary(i, model.weight_bytes[i]) for i in range(start, stop)))
        room = chip.sram_bytes - chip.program_bytes * (stop - start)
        for i in range(start, stop):  # the chip holds its weights, programs and each layer's activations
            rows.append((plus(weights, unary(i, model.act_bytes[i])), -np.inf, room))
        if stop < n:  # ... and greedy packing would not add the next chip's first layer
            first = model.weight_bytes[stop] + np.maximum(model.act_bytes[stop], _least_act(model, start, stop))
            rows.append((plus(weights, unary(stop, first)), room - chip.program_bytes + 1, np.inf))
    if "period_s" in caps:
        for run, tail in zip(runs, tails, strict=True):
            rows += [(plus(run, t), -np.inf, caps["period_s"] * f) for t in tail]
        rows += [(t, -np.inf, caps["period_s"]) for t in transfers]
    if "cycles" in caps:
        for k, tail in enumerate(tails):
            rows += [(plus(t, {zoff + k: -1.0}), -np.inf, 0.0) for t in tail]
        rows.append((plus(*runs, {zoff + k: 1.0 for k in range(len(starts))}, *(plus(t, scale=f) for t in transfers)),
                     -np.inf, caps["cycles"] * frames))
    if "energy_j" in caps:
        for run, tail in zip(runs, tails, strict=True):  # the period, in cycles
            rows += [(plus(run, t, {period: -1.0}), -np.inf, 0.0) for t in tail]
        rows += [(plus(t, {period: -1.0 / f}), -np.inf, 0.0) for t in transfers]
        rows.append((plus(*dynamic, *pcie_j, {period: len(starts) * static}), -np.inf, caps["energy_j"] * frames))
    if "sram_bytes" in caps:
        rows.append((plus(*(unary(i, model.weight_bytes[i]) for i in range(n))), -np.inf, caps["sram_bytes"]))
    r, c, v, lo, hi = [], [], [], [], []
    for row, (expr, low, high) in enumerate(rows):
        scale = max((abs(a) for a in expr.values()), default=1.0) or 1.0
        for col, val in expr.items():
            if val:
                r.append(row)
                c.append(col)
                v.append(val / scale)
        lo.append(low / scale)
        hi.append(high / scale)
    cost = np.zeros(nv)
    cost[:xoff[-1]] = np.concatenate([np.asarray(s, dtype=float) for s in scores])
    integrality = np.zeros(nv)
    integrality[:xoff[-1]] = 1
    upper = np.ones(nv)
    upper[zoff:] = np.inf
    res = milp(cost, constraints=LinearConstraint(coo_matrix((v, (r, c)), shape=(len(lo), nv)).tocsr(), lo, hi),
               integrality=integrality, bounds=Bounds(0, upper),
               options={"mip_rel_gap": 0.0} | ({} if node_limit is None else {"node_limit": node_limit}))
    if res.x is None:
        return None
    return [int(np.argmax(res.x[xoff[i]: xoff[i + 1]])) for i in range(n)]
