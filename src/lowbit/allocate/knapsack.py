"""Multiple-choice knapsack: one option per layer, least total distortion, total bits within a budget.

    minimise Σ_l d[l, o_l]   subject to   Σ_l b[l, o_l] ≤ C

`d` is the measured loss increase of layer l under option o (additive across layers: the first-order
model of how per-layer errors combine), `b` its stored bits (all metadata). Two solvers:

* `solve_dp` — exact on bits rounded *up* to a `unit` (so a DP-feasible plan is truly within C):
  dp_l[c] = min_o dp_{l−1}[c − b̃[l, o]] + d[l, o], vectorised over c; O(L·O·C/unit).
* `solve_lagrangian` — min_o d[l, o] + λ·b[l, o] per layer, λ bisected until the bits fit. It can only
  reach plans on the lower convex hull of each layer's (bits, d) points, so the DP is never worse; the
  Lagrangian is kept as a cross-check and for budgets too large for the DP table.
"""

from __future__ import annotations

import math

import numpy as np

from lowbit.errors import LowbitError


def _check(d: np.ndarray, b: np.ndarray, capacity: float) -> tuple[np.ndarray, np.ndarray]:
    d, b = np.asarray(d, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if d.ndim != 2 or d.shape != b.shape or d.shape[0] == 0 or d.shape[1] == 0:
        raise LowbitError(f"knapsack: need matching [layers, options] tables, got {d.shape} and {b.shape}")
    # an option without a finite measurement or bit count (not applicable, not measured) is never chosen
    unusable = ~np.isfinite(d) | ~np.isfinite(b)
    if (b[~unusable] < 0).any():
        raise LowbitError("knapsack: option bits must be non-negative")
    if unusable.all(1).any():
        raise LowbitError(f"knapsack: layer {int(np.flatnonzero(unusable.all(1))[0])} has no usable option")
    d, b = np.where(unusable, np.inf, d), np.where(unusable, 0.0, b)
    least = np.where(unusable, np.inf, b).min(1).sum()
    if least > capacity:
        raise LowbitError(f"budget infeasible: the cheapest option of every layer needs {least:.0f} "
                          f"bits, the budget is {capacity:.0f}")
    return d, b


def solve_dp(d, b, capacity: float, unit: float | None = None, max_cells: int = 200_000) -> np.ndarray:
    """Exact multiple-choice knapsack on bits rounded up to `unit` (default: capacity / max_cells).
    Returns the chosen option index per layer. Ties go to the fewer-bits option, then the lower index."""
    d, b = _check(d, b, capacity)
    unit = unit or capacity / max_cells
    w = np.ceil(b / unit - 1e-9).astype(np.int64)
    C = int(math.floor(capacity / unit + 1e-9))
    L, O = d.shape
    if np.where(np.isfinite(d), w, C + 1).min(1).sum() > C:
        raise LowbitError("budget infeasible after rounding bits to the DP unit; use a finer unit")
    dp = np.full(C + 1, np.inf)
    dp[0] = 0.0  # dp[c]: least distortion of the layers so far using exactly c units
    choice = np.zeros((L, C + 1), dtype=np.int32)
    for l in range(L):
        order = np.lexsort((np.arange(O), w[l]))
        new = np.full(C + 1, np.inf)
        for o in order:
            k = w[l, o]
            if k > C or not np.isfinite(d[l, o]):
                continue
            cand = np.full(C + 1, np.inf)
            cand[k:] = dp[: C + 1 - k] + d[l, o]
            better = cand < new
            new[better] = cand[better]
            choice[l, better] = o
        dp = new
    if not np.isfinite(dp).any():
        raise LowbitError("budget infeasible: no combination of measured options fits")
    best = dp.min()
    c = int(np.flatnonzero(dp == best)[0])  # the fewest units among the optimal plans
    plan = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        o = int(choice[l, c])
        plan[l] = o
        c -= int(w[l, o])
    return plan


def solve_lagrangian(d, b, capacity: float, iters: int = 100) -> np.ndarray:
    """argmin_o d + λ·b per layer with the least λ ≥ 0 whose plan fits (bisection on λ)."""
    d, b = _check(d, b, capacity)

    def plan(lam: float) -> np.ndarray:
        return _argmin_ties(d + lam * b, b)

    def bits(p):
        return b[np.arange(len(p)), p].sum()

    p0 = plan(0.0)
    if bits(p0) <= capacity:
        return p0
    lo, hi = 0.0, 1.0
    while bits(plan(hi)) > capacity:
        hi *= 2
        if hi > 1e30:
            return b.argmin(1)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if bits(plan(mid)) > capacity:
            lo = mid
        else:
            hi = mid
    return plan(hi)


def _argmin_ties(cost: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise argmin of `cost`; among equal costs the fewest bits."""
    best = cost.min(1, keepdims=True)
    tied = cost <= best
    return np.where(tied, b, np.inf).argmin(1)
