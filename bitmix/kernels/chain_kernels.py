"""The chain solvers' inner loops (`bitmix.compiler.chain` imports this on first use), compiled by Numba: here
with the other kernels so that `warmup` fills their cache too (the compiler is a layer above the kernels)."""

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
    """One layer of the Pareto DP: extend every state by every choice, keep the non-dominated ones per choice.

    States come grouped by their choice, each group cheapest first (as this step emits them), so the
    candidates of a new choice are a k-way merge of sorted runs: no sort, and the first candidate
    whose cheapest completion overflows `limit` ends the choice."""
    m, k = cost.shape[0], s.shape[0]
    out_c, out_s = np.empty(m * k), np.empty(m * k)
    out_p, out_j = np.empty(m * k, np.int64), np.empty(m * k, np.int64)
    first, stop, prev = np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64)
    groups = 0
    for a in range(m):
        if a == 0 or cur[a] != cur[a - 1]:
            first[groups], prev[groups] = a, cur[a]
            groups += 1
        stop[groups - 1] = a + 1
    pos = np.empty(groups, np.int64)
    kept = 0
    for j in range(k):
        pos[:] = first[:groups]
        run = np.inf
        while True:
            g_best, c_best = -1, np.inf
            for g in range(groups):
                if pos[g] < stop[g]:
                    c = cost[pos[g]] + w[prev[g], j]
                    if c < c_best:
                        g_best, c_best = g, c
            if g_best < 0 or c_best + rest_cost[j] > limit:
                break
            a = pos[g_best]
            pos[g_best] += 1
            sj = score[a] + s[j]
            if sj >= run or sj + rest[j] > bound or sj + suffix[j] - lam * (capacity - c_best) > bound:
                continue
            run = sj
            out_c[kept], out_s[kept], out_p[kept], out_j[kept] = c_best, sj, a, j
            kept += 1
    return out_c[:kept], out_s[:kept], out_p[:kept], out_j[:kept]


@njit(cache=True)
def lagrange_path(scores, w, kcount, close, lam, closed):  # pragma: no cover - compiled
    """argmin over choices of Σ (score + lam * cost), closing edge included (its first choice enumerated when
    `closed`); returns (choices, their cost Σ w). Min-plus DP with parents, one pass per first choice."""
    n, k = scores.shape
    best_val = np.inf
    best = np.zeros(n, np.int64)
    parents = np.zeros((n, k), np.int64)
    dist = np.empty(k)
    new = np.empty(k)
    choice = np.zeros(n, np.int64)
    for j0 in range(kcount[0] if closed else 1):
        for j in range(k):
            dist[j] = np.inf
        for j in range(kcount[0]):
            if not closed or j == j0:
                dist[j] = scores[0, j] + lam * w[0, 0, j]
        for i in range(1, n):
            for j in range(kcount[i]):
                new[j] = np.inf
                for p in range(kcount[i - 1]):
                    v = dist[p] + scores[i, j] + lam * w[i, p, j]
                    if v < new[j]:
                        new[j] = v
                        parents[i, j] = p
            for j in range(kcount[i]):
                dist[j] = new[j]
        for j in range(kcount[n - 1]):
            v = dist[j] + (lam * close[j, j0] if closed else 0.0)
            if v < best_val:
                best_val = v
                choice[n - 1] = j
                for i in range(n - 1, 0, -1):
                    choice[i - 1] = parents[i, choice[i]]
                best[:] = choice
    cost = w[0, 0, best[0]]
    for i in range(1, n):
        cost += w[i, best[i - 1], best[i]]
    if closed:
        cost += close[best[n - 1], best[0]]
    return best, cost
