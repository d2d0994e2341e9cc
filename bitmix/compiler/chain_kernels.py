"""The chain solvers' inner loops, compiled by Numba (`compiler/chain.py` imports this on first use)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def lagrange_suffix(scores, w, kcount, close, lam):  # pragma: no cover - compiled
    """suffix[i, j] = min over completions after choice j at layer i of Σ (score + lam * cost), closing edge
    included; then score_rest >= suffix[i, j] - lam * room for any completion costing <= room."""
    n, k = scores.shape
    suffix = np.full((n, k), np.inf)
    for j in range(kcount[n - 1]):
        suffix[n - 1, j] = lam * close[j]
    for i in range(n - 2, -1, -1):
        for j in range(kcount[i]):
            for q in range(kcount[i + 1]):
                v = scores[i + 1, q] + lam * w[i + 1, j, q] + suffix[i + 1, q]
                if v < suffix[i, j]:
                    suffix[i, j] = v
    return suffix


@njit(cache=True)
def dp_kernel(scores, w, kcount, slots, j0):  # pragma: no cover - compiled
    """best[j, c]: min score of the whole chain ending in choice j with weight <= c; parents[i, j, c]."""
    n, k = scores.shape
    width = slots + 1
    best = np.full((k, width), np.inf)
    for j in range(kcount[0]):
        if j0 >= 0 and j != j0:
            continue
        for c in range(w[0, 0, j], width):
            best[j, c] = scores[0, j]
    parents = np.zeros((n, k, width), np.int8)
    for i in range(1, n):
        new = np.full((k, width), np.inf)
        for j in range(kcount[i]):
            sj = scores[i, j]
            for p in range(kcount[i - 1]):
                wj = w[i, p, j]
                for c in range(wj, width):
                    v = best[p, c - wj] + sj
                    if v < new[j, c]:
                        new[j, c] = v
                        parents[i, j, c] = p
        best = new
    return best, parents


@njit(cache=True)
def pareto_step(cost, score, cur, w, s, rest_cost, rest, limit, bound, suffix, capacity, lam):  # pragma: no cover
    """One layer of the Pareto DP: extend every state by every choice, keep the non-dominated ones per choice."""
    m, k = cost.shape[0], s.shape[0]
    out_c, out_s = np.empty(m * k), np.empty(m * k)
    out_p, out_j = np.empty(m * k, np.int64), np.empty(m * k, np.int64)
    kept = 0
    c, sc, idx = np.empty(m), np.empty(m), np.empty(m, np.int64)
    for j in range(k):
        cnt = 0
        for a in range(m):
            cj, sj = cost[a] + w[cur[a], j], score[a] + s[j]
            if cj + rest_cost > limit or sj + rest > bound:
                continue
            if sj + suffix[j] - lam * (capacity - cj) <= bound:
                c[cnt], sc[cnt], idx[cnt] = cj, sj, a
                cnt += 1
        run = np.inf
        for o in np.argsort(c[:cnt], kind="mergesort"):  # cheapest first; keep strict score improvements
            if sc[o] < run:
                run = sc[o]
                out_c[kept], out_s[kept], out_p[kept], out_j[kept] = c[o], sc[o], idx[o], j
                kept += 1
    return out_c[:kept], out_s[:kept], out_p[:kept], out_j[:kept]
