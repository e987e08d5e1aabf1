"""Policy-gradient pruning: the budget projection against an exact breakpoint solution, the REINFORCE
estimator's mean against the analytic gradient of a quadratic objective (unbiased), and the optimiser
finding the brute-forced optimum of a small masked objective."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.prune.policy import estimate, hard_mask, optimise, project_budget, score


def _exact_projection(s: torch.Tensor, total: float) -> torch.Tensor:
    """Σ clip(s − v, 0, 1) is piecewise linear and non-increasing in v with breakpoints s_i and s_i − 1:
    find the segment holding `total` and solve the linear equation on it."""
    s = s.double()
    f = lambda v: float((s - v).clamp(0, 1).sum())  # noqa: E731
    bps = sorted(set((s.tolist())) | set((s - 1).tolist()))
    for a, b in zip(bps, bps[1:]):
        fa, fb = f(a), f(b)
        if fb <= total <= fa:
            v = a if fa == fb else a + (fa - total) * (b - a) / (fa - fb)
            return (s - v).clamp(0, 1)
    raise AssertionError("no segment")


@pytest.mark.parametrize("seed", range(4))
def test_projection_matches_the_breakpoint_solution(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(30, generator=g, dtype=torch.float64) * 0.8 + 0.5
    total = float(torch.randint(1, 29, (1,), generator=g))
    x = project_budget(s, total)
    ref = _exact_projection(s, total)
    assert float(x.sum()) == pytest.approx(total, abs=1e-9) and bool((x >= 0).all() and (x <= 1).all())
    assert float((x - ref).abs().max()) < 1e-9


def test_estimator_is_unbiased_on_a_quadratic():
    # L(m) = cᵀm + mᵀAm (A symmetric, zero diagonal) + dᵀm: E[L] = cᵀs + sᵀAs + dᵀs, ∇ = c + 2As + d
    g = torch.Generator().manual_seed(0)
    n = 6
    c, d = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (A + A.T) / 2
    A.fill_diagonal_(0)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.2
    K = 400_000
    m = (torch.rand((K, n), generator=g, dtype=torch.float64) < s).double()
    L = m @ c + ((m @ A) * m).sum(1) + m @ d
    true = c + 2 * A @ s + d
    per = (L - 0.7)[:, None] * score(m, s)  # the per-sample terms whose mean `estimate` returns
    est = estimate(L, m, s, baseline=0.7)
    assert torch.allclose(est, per.mean(0))
    se = per.std(0) / K ** 0.5
    assert bool(((est - true).abs() < 4 * se).all()), (est, true, se)
    # the baseline changes the variance, not the mean
    est0 = estimate(L, m, s, baseline=0.0)
    assert bool(((est0 - true).abs() < 4 * (L[:, None] * score(m, s)).std(0) / K ** 0.5).all())
    # the authors' normalised score is the same samples rescaled by √(s(1−s))·K/(K−1): not ∇
    norm = estimate(L, m, s, 0.7, kind="normalized")
    assert torch.allclose(norm, est * (s * (1 - s)).sqrt() * K / (K - 1), rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_optimiser_finds_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(1)
    n, keep = 12, 0.5
    c = torch.rand(n, generator=g, dtype=torch.float64) * 2  # cost of pruning i
    A = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.3  # extra cost of pruning i and j together
    A = torch.triu(A, 1)

    def loss(m: torch.Tensor, step: int) -> float:
        p = 1 - m.double()
        return float(c @ p + p @ A @ p)

    best = min(itertools.combinations(range(n), n // 2), key=lambda kept: loss(
        torch.zeros(n, dtype=torch.float64).index_fill_(0, torch.tensor(kept), 1.0), 0))
    # the authors' normalised score (the default): seeds 0, 1, 2 all find the optimum; the exact score's
    # 1/(s(1−s)) blows up near 0 and 1 and found it for 1 seed of 3 (measured)
    s = optimise(loss, torch.full((n,), keep, dtype=torch.float64), keep, steps=2000, samples=4, lr=0.02, seed=seed)
    assert float(s.sum()) == pytest.approx(n * keep, abs=1e-6)
    assert set(torch.nonzero(hard_mask(s, keep)).flatten().tolist()) == set(best)
