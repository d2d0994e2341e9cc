"""Exact solvers for a multiple-choice knapsack whose costs couple consecutive layers.

The cost of choices (j_0 … j_{n-1}) is Σ u_i[j_i] + Σ P_i[j_i, j_{i+1 mod n}] (a chain
closed by the last → first edge, see `bitmix.ir.cost.CostModel`). Solvers here:

- `min_cost`: the cheapest assignment (min-plus DP, first choice enumerated for the closing edge);
- `solve_dp`: min Σ score s.t. cost <= cap, DP with state = (previous choice, budget slot), run
  with costs rounded up (its answers are feasible) and down (its optimum is a lower bound), so
  the returned gap is a proof; an exact Pareto DP over real costs closes the gap when it can;
- `solve_ilp`: several caps at once, HiGHS with the pairwise terms linearised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitmix.errors import BitmixError

DP_RESOLUTION = 4096  # integer cost units between the cheapest chain and the cap
PARETO_LIMIT = 200_000  # states the exact gap-closing pass may keep before giving up
TOL = 1e-12
LAGRANGE_BISECTIONS = 12  # steps towards the dual optimum when looking for a good feasible answer


@dataclass(frozen=True)
class Chain:
    """One resource of a CostModel as per-layer arrays: W[0] (1 x k_0), W[i] = P[i-1] + u[i] (k_{i-1} x k_i),
    and the closing edge C (k_{n-1} x k_0)."""

    steps: tuple[np.ndarray, ...]
    close: np.ndarray

    @classmethod
    def of(cls, unary: Sequence[np.ndarray], pair: Sequence[np.ndarray]) -> Chain:
        n = len(unary)
        steps = [np.asarray(unary[0], dtype=float)[None, :]]
        steps += [np.asarray(pair[i - 1], dtype=float) + np.asarray(unary[i], dtype=float)[None, :]
                  for i in range(1, n)]
        close = np.asarray(pair[n - 1], dtype=float) if n > 1 else np.zeros((len(unary[0]), len(unary[0])))
        if n > 1 and np.all(close == close[:, :1]):  # the closing edge ignores the first choice: fold it
            steps[-1] = steps[-1] + close[:, 0][None, :]
            close = np.zeros_like(close)
        return cls(tuple(steps), close)

    @property
    def closed(self) -> bool:
        """Whether the last → first edge depends on the first choice (then solvers enumerate it)."""
        return bool(self.close.any())

    def cost(self, choice: Sequence[int]) -> float:
        total = float(self.steps[0][0, choice[0]])
        total += sum(float(self.steps[i][choice[i - 1], choice[i]]) for i in range(1, len(choice)))
        return total + (float(self.close[choice[-1], choice[0]]) if len(choice) > 1 else 0.0)

    def shifted(self) -> tuple[Chain, float]:
        """The same chain with every table's minimum moved into one constant: (extras >= 0, base)."""
        base = sum(float(s.min()) for s in self.steps) + float(self.close.min())
        return Chain(tuple(s - s.min() for s in self.steps), self.close - self.close.min()), base


def min_cost(chain: Chain) -> tuple[float, list[int]]:
    """The cheapest assignment of the chain (exact min-plus DP, O(n k^3))."""
    weights = _padded_weights(chain, np.inf)
    kcount = np.array([s.shape[1] for s in chain.steps], dtype=np.int64)
    choice, cost = kernels().lagrange_path(np.zeros(weights.shape[:2]), weights, kcount, chain.close, 1.0,
                                           chain.closed)
    return float(cost), [int(j) for j in choice]


def solve_dp(scores: Sequence[np.ndarray], chain: Chain, cap: float) -> tuple[list[int], float]:
    """min Σ score s.t. chain cost <= cap; returns (choices, proven gap). Raises if nothing fits."""
    extra, base = chain.shifted()
    capacity = cap * (1 + TOL) - base
    if capacity < -TOL * abs(cap):
        raise BitmixError("no assignment fits the cap")
    capacity = max(capacity, 0.0)
    span = sum(float(s.max()) for s in extra.steps) + float(extra.close.max())
    free = [int(np.argmin(s)) for s in scores]
    if span <= capacity or extra.cost(free) <= capacity:
        return free, 0.0  # the best choice per layer already fits
    lams = _multipliers(scores, extra, capacity)
    lagrangian = _lagrangian_choice(scores, extra, capacity, max(lams))  # a good feasible answer bounds the exact
    if lagrangian is not None:
        upper = sum(float(sc[j]) for sc, j in zip(scores, lagrangian, strict=True))
        exact = _pareto_dp(scores, extra, capacity, upper, lams)
        if exact is not None:
            return exact, 0.0
    choice, upper, lower, proven = _scaled_dp(scores, extra, capacity, DP_RESOLUTION)  # fallback: proven gap
    if proven:
        return choice, 0.0
    if lagrangian is not None and sum(float(sc[j]) for sc, j in zip(scores, lagrangian, strict=True)) < upper:
        choice, upper = lagrangian, sum(float(sc[j]) for sc, j in zip(scores, lagrangian, strict=True))
    if choice is None:
        raise BitmixError("the scaled DP found no feasible assignment near the cap; use solver='ilp'")
    return choice, max(0.0, upper - lower)


def _multipliers(scores: Sequence[np.ndarray], extra: Chain, capacity: float) -> list[float]:
    """Per first choice (one entry if the chain is open), the multiplier maximising the dual bound."""
    padded, kcount = _padded_scores(scores)
    weights = _padded_weights(extra, np.inf)
    if not extra.closed:
        return [max(_best_multiplier(padded, weights, kcount, np.zeros(len(scores[-1])), capacity, -1), 1e-300)]
    return [max(_best_multiplier(padded, weights, kcount, extra.close[:, j0], capacity, j0), 1e-300)
            for j0 in range(len(scores[0]))]


def _lagrangian_choice(scores: Sequence[np.ndarray], extra: Chain, capacity: float, lam: float) -> list[int] | None:
    """The best-scoring fitting min Σ (score + lam * cost) assignment over lams bisected towards the dual optimum."""
    padded, kcount = _padded_scores(scores)
    weights = _padded_weights(extra, np.inf)

    fitting: list[tuple[float, list[int]]] = []  # every probe that fits, with its score

    def path(lam: float) -> tuple[list[int], bool]:
        found, cost = kernels().lagrange_path(padded, weights, kcount, extra.close, lam, extra.closed)
        choice = [int(j) for j in found]
        if cost <= capacity:
            fitting.append((sum(float(sc[j]) for sc, j in zip(scores, choice, strict=True)), choice))
        return choice, bool(cost <= capacity)

    low, high, best = lam, lam, None
    for _ in range(40):  # bracket: `high` fits, `low` does not (or is tiny); then bisect between them
        choice, ok = path(high)
        if ok:
            best = choice
            break
        low, high = high, high * 1.5
    if best is None:
        return None
    if low == high:
        for _ in range(40):
            low /= 1.5
            choice, ok = path(low)
            if not ok:
                break
            high, best = low, choice
    for _ in range(LAGRANGE_BISECTIONS):
        mid = (low + high) / 2
        choice, ok = path(mid)
        if ok:
            high, best = mid, choice
        else:
            low = mid
    return min(fitting, key=lambda f: f[0])[1]


def _scaled_dp(scores: Sequence[np.ndarray], extra: Chain, capacity: float, resolution: int
               ) -> tuple[list[int] | None, float, float, bool]:
    """DP on costs rounded up (feasible answer, `upper`) and down (`lower` bound): (choice, upper, lower, optimal?)."""
    unit = capacity / resolution if capacity > 0 else 1.0
    slots = resolution if capacity > 0 else 0
    upper, up_choice = _dp(scores, _scaled(extra, unit, slots, np.ceil), slots)
    lower, low_choice = _dp(scores, _scaled(extra, unit, slots, np.floor), slots)
    if low_choice is None:
        raise BitmixError("no assignment fits the cap")
    if extra.cost(low_choice) <= capacity:
        return low_choice, lower, lower, True  # the relaxation's optimum is feasible, hence optimal
    if up_choice is not None and upper <= lower:
        return up_choice, upper, lower, True
    return up_choice, upper, lower, False


def _scaled(chain: Chain, unit: float, slots: int, rounding) -> Chain:
    def conv(a: np.ndarray) -> np.ndarray:
        return np.minimum(rounding(a / unit), slots + 1).astype(np.int64)

    return Chain(tuple(conv(s) for s in chain.steps), conv(chain.close))


def _dp(scores: Sequence[np.ndarray], w: Chain, slots: int) -> tuple[float, list[int] | None]:
    """Integer weights: min Σ score with Σ weight <= slots (first choice enumerated if the chain is closed)."""
    n = len(scores)
    sc, kcount = _padded_scores(scores)
    wt = _padded_weights(w, slots)
    best_val, best_choice = np.inf, None
    for j0 in range(len(scores[0])) if w.closed else [-1]:
        best, parents = kernels().dp_kernel(sc, wt, kcount, slots, j0)
        for j in range(kcount[-1]):
            c = slots - (int(w.close[j, j0]) if j0 >= 0 else 0)
            if c < 0 or best[j, c] >= best_val:
                continue
            best_val = float(best[j, c])
            choice = [0] * n
            choice[-1] = j
            for i in range(n - 1, 0, -1):
                p = int(parents[i, choice[i], c])
                c -= int(wt[i, p, choice[i]])
                choice[i - 1] = p
            best_choice = choice
    return best_val, best_choice


def _padded_scores(scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sc = np.full((len(scores), max(len(s) for s in scores)), np.inf)
    for i, s in enumerate(scores):
        sc[i, : len(s)] = s
    return sc, np.array([len(s) for s in scores], dtype=np.int64)


def _padded_weights(w: Chain, slots: float) -> np.ndarray:
    k = max(st.shape[1] for st in w.steps)
    wt = np.full((len(w.steps), k, k), slots + 1, dtype=np.int64 if np.isfinite(slots) else float)
    for i, st in enumerate(w.steps):
        wt[i, : st.shape[0], : st.shape[1]] = st
    return wt


def _best_multiplier(scores: np.ndarray, weights: np.ndarray, kcount: np.ndarray, close: np.ndarray,
                     capacity: float, j0: int) -> float:
    """The multiplier maximising the dual bound min Σ (score + lam * cost) - lam * capacity (concave in lam)."""
    first = range(kcount[0]) if j0 < 0 else [j0]

    def dual(lam: float) -> float:
        suffix = kernels().lagrange_suffix(scores, weights, kcount, close, lam)
        return min(scores[0, j] + lam * weights[0, 0, j] + suffix[0, j] for j in first) - lam * capacity

    finite = scores[np.isfinite(scores)]
    scale = max(float(finite.max() - finite.min()), 1e-12) / max(capacity, 1e-12)
    lo, hi = np.log(scale * 1e-6), np.log(scale * 1e6)
    for _ in range(60):  # golden-section search on log lam (the dual is unimodal in it)
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if dual(np.exp(a)) < dual(np.exp(b)):
            lo = a
        else:
            hi = b
    return float(np.exp((lo + hi) / 2))


def _pareto_dp(scores: Sequence[np.ndarray], extra: Chain, capacity: float, upper: float, lams: Sequence[float]
               ) -> list[int] | None:
    """Exact DP over real costs: the best end state of `_pareto_ends`. None if the states outgrow `PARETO_LIMIT`."""
    ends = _pareto_ends(scores, extra, capacity, upper, lams)
    if ends is None:
        return None
    cost, score, trace = ends
    return trace(int(np.argmin(score))) if len(score) else None


def pareto_front(scores: Sequence[np.ndarray], chain: Chain, cap: float) -> list[tuple[float, float, list[int]]] | None:
    """Every non-dominated (cost, Σ score, choices) with cost <= cap, cheapest first (exact).
    None if the states outgrow `PARETO_LIMIT` (then solve budget by budget)."""
    extra, base = chain.shifted()
    ends = _pareto_ends(scores, extra, cap * (1 + TOL) - base, np.inf, [0.0] * len(scores[0]))
    if ends is None:
        return None
    cost, score, trace = ends
    order = np.lexsort((score, cost))
    front = []
    for k in order:
        if not front or score[k] < front[-1][1]:
            front.append((float(cost[k]) + base, float(score[k]), trace(int(k))))
    return front


def _pareto_ends(scores: Sequence[np.ndarray], extra: Chain, capacity: float, upper: float, lams: Sequence[float]):
    """Per current choice, the non-dominated (cost, score) states layer by layer; returns the end states
    (closing edge added) and a function tracing an end state back to its choices.

    A state is dropped when even the cheapest completion of its choice overflows `capacity`, or when
    its score plus a lower bound on the best completion exceeds `upper` (or the best end of an earlier
    first choice); that bound is Lagrangian (`lagrange_suffix` with `lams`, the multipliers that
    maximise the whole chain's dual bound per first choice)."""
    n = len(scores)
    bound = upper + 1e-12 * max(1.0, abs(upper)) if np.isfinite(upper) else np.inf
    limit = capacity * (1 + TOL) + TOL
    padded_scores, kcount = _padded_scores(scores)
    weights = _padded_weights(extra, np.inf)
    zeros = np.zeros_like(padded_scores)
    costs, score_list, refs, histories = [], [], [], []
    for j0 in range(len(scores[0])) if extra.closed else [-1]:
        close = extra.close[:, j0] if j0 >= 0 else np.zeros(extra.close.shape[0])
        lam = lams[max(j0, 0)] if np.isfinite(bound) else 0.0
        suffix = kernels().lagrange_suffix(padded_scores, weights, kcount, close, lam)
        rest_cost = kernels().lagrange_suffix(zeros, weights, kcount, close, 1.0)  # cheapest completion per choice
        rest = kernels().lagrange_suffix(padded_scores, weights, kcount, close, 0.0)  # best score completion
        cur = np.arange(len(scores[0])) if j0 < 0 else np.array([j0])
        cost, score = extra.steps[0][0, cur], np.asarray(scores[0], dtype=float)[cur]
        history = [(np.full(len(cur), -1), cur)]
        for i in range(1, n):
            cost, score, par, cur = kernels().pareto_step(
                cost, score, cur, extra.steps[i], np.asarray(scores[i], dtype=float), rest_cost[i], rest[i],
                limit, bound, suffix[i], capacity, lam)
            history.append((par, cur))
            if len(cost) > PARETO_LIMIT:
                return None
        end = cost + (extra.close[cur, j0] if j0 >= 0 else 0.0)
        ok = np.flatnonzero(end <= limit)
        costs.append(end[ok])
        score_list.append(score[ok])
        refs += [(len(histories), int(k)) for k in ok]
        histories.append(history)
        if np.isfinite(bound) and len(ok):  # later first choices need only beat the best end found so far
            bound = min(bound, float(score[ok].min()) + 1e-12 * max(1.0, abs(upper)))

    def trace(k: int) -> list[int]:
        h, idx = refs[k]
        choice = [0] * n
        for i in range(n - 1, -1, -1):
            choice[i] = int(histories[h][i][1][idx])
            idx = int(histories[h][i][0][idx])
        return choice

    return np.concatenate(costs), np.concatenate(score_list), trace


def solve_ilp(scores: Sequence[np.ndarray], rows: Sequence[tuple[Chain, float]],
              extra_rows: Sequence[tuple[Sequence[np.ndarray], float]] = ()) -> list[int]:
    """min Σ score s.t. every (chain, cap) row holds, plus linear rows over the choice variables.

    Binary x[i, j]; a continuous y[i, p, j] per pairwise table, tied to x by its row and column
    sums (which force y = x[i-1, p] · x[i, j] once x is integral). HiGHS to optimality.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n = len(scores)
    sizes = [len(s) for s in scores]
    xoff = np.concatenate([[0], np.cumsum(sizes)])
    nx = int(xoff[-1])
    edges = [(i - 1, i) for i in range(1, n)] + ([(n - 1, 0)] if n > 1 else [])
    yoff = [nx]
    for a, b in edges:
        yoff.append(yoff[-1] + sizes[a] * sizes[b])
    nv = yoff[-1]
    r, c, v, lo, hi = [], [], [], [], []

    def add_row(entries: list[tuple[int, float]], low: float, high: float) -> None:
        row = len(lo)
        for col, val in entries:
            r.append(row)
            c.append(col)
            v.append(val)
        lo.append(low)
        hi.append(high)

    for i in range(n):
        add_row([(xoff[i] + j, 1.0) for j in range(sizes[i])], 1.0, 1.0)
    for e, (a, b) in enumerate(edges):
        ka, kb = sizes[a], sizes[b]
        for p in range(ka):
            add_row([(yoff[e] + p * kb + j, 1.0) for j in range(kb)] + [(xoff[a] + p, -1.0)], 0.0, 0.0)
        for j in range(kb):
            add_row([(yoff[e] + p * kb + j, 1.0) for p in range(ka)] + [(xoff[b] + j, -1.0)], 0.0, 0.0)
    for chain, cap in rows:
        extra, base = chain.shifted()
        tables = [extra.steps[i] for i in range(1, n)] + ([extra.close] if n > 1 else [])
        scale = max(max(float(t.max()) for t in [extra.steps[0], *tables]), 1e-300)
        entries = [(xoff[0] + j, float(extra.steps[0][0, j]) / scale) for j in range(sizes[0])]
        for e, t in enumerate(tables):
            entries += [(yoff[e] + k, float(val) / scale) for k, val in enumerate(t.ravel()) if val]
        add_row(entries, -np.inf, (cap * (1 + TOL) - base) / scale)
    for coeffs, cap in extra_rows:
        scale = max(max(float(np.abs(a).max()) for a in coeffs), 1e-300)
        add_row([(xoff[i] + j, float(a[j]) / scale) for i, a in enumerate(coeffs) for j in range(sizes[i]) if a[j]],
                -np.inf, cap / scale)
    matrix = coo_matrix((v, (r, c)), shape=(len(lo), nv)).tocsr()
    cost = np.concatenate([np.concatenate([np.asarray(s, dtype=float) for s in scores]), np.zeros(nv - nx)])
    integrality = np.concatenate([np.ones(nx), np.zeros(nv - nx)])
    res = milp(cost, constraints=LinearConstraint(matrix, lo, hi), integrality=integrality, bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise BitmixError(f"the ILP found no feasible assignment ({res.message}); raise the budget")
    return [int(np.argmax(res.x[xoff[i]: xoff[i + 1]])) for i in range(n)]


def kernels():  # noqa: ANN201
    """The Numba module, imported on first use so `import bitmix` stays Numba-free."""
    from bitmix.kernels import chain_kernels

    return chain_kernels
