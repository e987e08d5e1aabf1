"""UDFC math against independent references: exact cases, an L-BFGS minimiser of the same objective,
Monte Carlo / scipy for the Gaussian moment formulas, brute force for the greedy criterion."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.prune import compensation as comp
from lowbit.prune import criteria
from lowbit.prune.hf import _merge_T
from lowbit.prune.moments import (
    bn_preactivation_gaussian,
    bvn_cdf,
    rectified_gaussian_moments,
    relu_mean_sq,
    relu_pair_second,
    sample_moments,
)

f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(seed, n=10, m=7, N=4000, noise=0.3):
    """Samples of a = ReLU(u) and ã = ReLU(u + quantization-like noise), a next layer W [m, n]."""
    g = _gen(seed)
    u = torch.randn(N, n, generator=g, dtype=f64) @ torch.randn(n, n, generator=g, dtype=f64) * 0.5 + 0.2
    a = u.relu()
    aq = (u + noise * torch.randn(N, n, generator=g, dtype=f64)).relu()
    W = torch.randn(m, n, generator=g, dtype=f64)
    return a, aq, W


def _jm(a, aq):
    return comp.JointMoments.from_joint(sample_moments(torch.cat([a, aq], 1)), a.shape[1])


def test_exact_linear_combination_is_reproduced():
    """a_p an exact combination of kept channels, no quantization: W'·a_K = W·a to rounding."""
    g = _gen(0)
    N, m = 3000, 6
    aK = torch.randn(N, 5, generator=g, dtype=f64).relu()
    coef = torch.randn(2, 5, generator=g, dtype=f64)
    a = torch.cat([aK[:, :2], aK @ coef[0:1].T, aK[:, 2:], aK @ coef[1:2].T], 1)  # pruned: columns 2 and 6
    keep = torch.tensor([0, 1, 3, 4, 5])
    W = torch.randn(m, 7, generator=g, dtype=f64)
    jm = comp.JointMoments.from_joint(sample_moments(a), 7)
    z = a @ W.T
    for family in ("scale", "prune", "full"):
        T = comp.solve_T(comp.gram(W), jm, keep, family, damp=0.0)
        z2 = a[:, keep] @ comp.fold(W, T).T
        assert (z2 - z).norm() / z.norm() < 1e-10, family
    none = a[:, keep] @ comp.fold(W, comp.identity_T(7, keep)).T
    assert (none - z).norm() / z.norm() > 0.1  # the case is not trivial


def _lbfgs(a, aq, W, keep, family):
    """Numerical minimiser of the Monte-Carlo objective mean‖W(a − T ã_K)‖² over the family, float64."""
    n, k = a.shape[1], keep.numel()
    prune = criteria.keep_from_pruned(n, keep)  # the complement
    cols = torch.arange(k)
    s = torch.ones(k, dtype=f64, requires_grad=True)
    S = torch.zeros(prune.numel(), k, dtype=f64, requires_grad=True)
    Tfull = torch.zeros(n, k, dtype=f64, requires_grad=True)
    params = {"scale": [s, S], "prune": [S], "full": [Tfull]}[family]

    def build():
        if family == "full":
            return Tfull
        diag = s if family == "scale" else torch.ones(k, dtype=f64)
        return torch.zeros(n, k, dtype=f64).index_put((keep, cols), diag).index_put((prune,), S)

    opt = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = (a - aq[:, keep] @ build().T) @ W.T
        loss = (e * e).sum(1).mean()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return build().detach()


@pytest.mark.parametrize("family", ["scale", "prune", "full"])
def test_closed_form_matches_lbfgs(family):
    a, aq, W = _problem(1)
    keep = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    jm = _jm(a, aq)
    G = comp.gram(W)
    T = comp.solve_T(G, jm, keep, family, damp=0.0)
    Tn = _lbfgs(a, aq, W, keep, family)
    l_cf, l_num = comp.expected_error(G, jm, keep, T), comp.expected_error(G, jm, keep, Tn)
    # the closed form's objective is the MC objective exactly (same sample moments)
    e = (a - aq[:, keep] @ T.T) @ W.T
    assert abs(l_cf - float((e * e).sum(1).mean())) / l_cf < 1e-10
    assert l_cf <= l_num * (1 + 1e-10)
    assert abs(l_cf - l_num) / l_cf < 1e-9
    if family != "full":  # m < n: G is singular, so the "full" minimiser is not unique (objective checked)
        assert (T - Tn).abs().max() < 1e-6


def test_compensation_never_worse_than_none_or_merge():
    for seed in range(6):
        a, aq, W = _problem(10 + seed, n=12, m=9 + seed, noise=0.1 * seed)
        jm = _jm(a, aq)
        G = comp.gram(W)
        g = _gen(seed)
        keep = torch.sort(torch.randperm(12, generator=g)[: 5 + seed]).values
        prune = criteria.keep_from_pruned(12, keep)
        none = comp.expected_error(G, jm, keep, comp.identity_T(12, keep))
        merge = comp.expected_error(G, jm, keep, _merge_T(jm, keep, prune, -1.0))
        for centred in (False, True):
            j = jm.centred() if centred else jm
            base = comp.expected_error(G, j, keep, comp.identity_T(12, keep))
            for family in ("scale", "prune", "full"):
                e = comp.expected_error(G, j, keep, comp.solve_T(G, j, keep, family, damp=0.0))
                assert e <= base * (1 + 1e-12), (seed, family, centred)
        e = comp.expected_error(G, jm, keep, comp.solve_T(G, jm, keep, "scale", damp=0.0))
        assert e <= merge * (1 + 1e-12) and e <= none * (1 + 1e-12)


def test_univariate_relu_moments_match_quadrature():
    from scipy import integrate
    from scipy.stats import norm

    for m, s in [(0.7, 1.3), (-1.5, 0.4), (0.0, 2.0), (3.0, 0.5)]:
        e1, e2 = relu_mean_sq(torch.tensor(m, dtype=f64), torch.tensor(s, dtype=f64))
        r1 = integrate.quad(lambda x: max(x, 0) * norm.pdf(x, m, s), -30, 30, points=[0], epsabs=1e-13)[0]
        r2 = integrate.quad(lambda x: max(x, 0) ** 2 * norm.pdf(x, m, s), -30, 30, points=[0], epsabs=1e-13)[0]
        assert abs(float(e1) - r1) < 1e-10 and abs(float(e2) - r2) < 1e-10


def test_bivariate_cdf_matches_scipy():
    from scipy.stats import multivariate_normal

    for h, k, r in [(0.3, -0.5, 0.7), (1.2, 0.4, -0.9), (0.0, 0.0, 0.99999), (-2.0, 1.0, 0.3), (1.0, 1.0, -0.999)]:
        ref = multivariate_normal([0, 0], [[1, r], [r, 1]]).cdf([h, k])
        got = float(bvn_cdf(*(torch.tensor(v, dtype=f64) for v in (h, k, r))))
        assert abs(got - ref) < 1e-7  # scipy's own cdf is accurate to ~1e-8


def test_rectified_gaussian_moments_match_monte_carlo():
    """Closed forms vs 10⁶ samples: tolerance 5 standard errors of the MC estimate."""
    g = _gen(3)
    mean = torch.tensor([0.3, -0.5, 1.0, -2.0], dtype=f64)
    L = torch.randn(4, 4, generator=g, dtype=f64)
    cov = L @ L.T + 0.1 * torch.eye(4, dtype=f64)
    M = rectified_gaussian_moments(mean, cov)
    N = 1_000_000
    a = (torch.randn(N, 4, generator=g, dtype=f64) @ torch.linalg.cholesky(cov).T + mean).relu()
    S = sample_moments(a)
    se_mean = a.std(0) / math.sqrt(N)
    prod = a[:, :, None] * a[:, None, :]
    se_second = prod.std(0) / math.sqrt(N)
    assert ((M.mean - S.mean).abs() <= 5 * se_mean + 1e-12).all()
    assert ((M.second - S.second).abs() <= 5 * se_second + 1e-12).all()
    # a degenerate pair (ρ = 1, equal laws) gives E[a²] off the diagonal too
    v = relu_pair_second(*(torch.tensor(x, dtype=f64) for x in (0.4, 1.5, 0.4, 1.5, 1.0)))
    assert abs(float(v) - float(relu_mean_sq(torch.tensor(0.4, dtype=f64), torch.tensor(1.5, dtype=f64))[1])) < 1e-6


def test_bn_gaussian_model_is_white_input_covariance():
    """The proxy: u = β + γ·(w/‖w‖)ᵀξ; check against samples of ξ pushed through the filters."""
    g = _gen(4)
    W = torch.randn(5, 12, generator=g, dtype=f64)
    Wq = W + 0.05 * torch.randn(5, 12, generator=g, dtype=f64)
    gamma, beta = torch.rand(5, generator=g, dtype=f64) + 0.5, torch.randn(5, generator=g, dtype=f64)
    mean, cov = bn_preactivation_gaussian(W, Wq, gamma, beta)
    xi = torch.randn(400_000, 12, generator=g, dtype=f64)
    nrm = W.norm(dim=1)
    u = beta + gamma * (xi @ W.T) / nrm
    uq = beta + gamma * (xi @ Wq.T) / nrm
    S = sample_moments(torch.cat([u, uq], 1))
    assert torch.allclose(S.cov(), cov, atol=0.02 * float(cov.diagonal().max()))
    assert torch.allclose(torch.diagonal(cov)[:5], gamma**2)


def test_recon_criterion_costs_are_the_true_compensated_errors():
    """G_pp/(C⁻¹)_pp (and its downdated form) = the expected error after the optimal compensation."""
    a, _, W = _problem(5, n=9, m=11)
    jm = comp.JointMoments.from_joint(sample_moments(a), 9)
    G = comp.gram(W)
    Ci = torch.linalg.inv(jm.aa)
    for p in range(9):
        keep = criteria.keep_from_pruned(9, torch.tensor([p]))
        exact = comp.expected_error(G, jm, keep, comp.solve_T(G, jm, keep, "prune", damp=0.0))
        assert abs(float(G[p, p] / Ci[p, p]) - exact) / exact < 1e-9
    order = criteria.recon_order(torch.diagonal(G), jm.aa, 3, damp=0.0)
    # brute force of the greedy rule: at each step, the cheapest single removal given the rest
    alive = list(range(9))
    for p_chosen in order.tolist():
        costs = {}
        for p in alive:
            rest = [q for q in alive if q != p]
            sub = jm.aa[rest][:, rest]
            resid = jm.aa[p, p] - jm.aa[p, rest] @ torch.linalg.solve(sub, jm.aa[rest, p])
            costs[p] = float(G[p, p] * resid)
        assert p_chosen == min(costs, key=costs.get)
        alive.remove(p_chosen)


def test_solver_is_deterministic():
    a, aq, W = _problem(7)
    jm = _jm(a, aq)
    keep = torch.tensor([1, 2, 4, 7, 8])
    T1 = comp.solve_T(comp.gram(W), jm, keep)
    T2 = comp.solve_T(comp.gram(W), jm, keep)
    assert torch.equal(T1, T2)
