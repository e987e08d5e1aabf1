"""1-D k-means: the DP solver against brute force, Lloyd's invariants, speed-independent quality bounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.kmeans import kmeans_1d, kmeans_1d_optimal, nearest, sse


def _heavy(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, m, generator=g) * 0.02
    X[:, :: max(1, m // 7)] *= 8  # a few large entries per vector, like LLM weight columns
    return X + 0.01 * torch.randn(n, 1, generator=g)


def _brute_force_sse(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Minimum weighted SSE over every assignment of the m points to k labels (k^m of them), each
    cluster at its weighted mean: no contiguity assumption."""
    x, w = x.double(), w.double()
    labels = torch.tensor(list(itertools.product(range(k), repeat=x.numel())))  # [L, m]
    onehot = torch.nn.functional.one_hot(labels, k).double() * w[None, :, None]  # [L, m, k]
    s0 = onehot.sum(1)
    mu = (onehot * x[None, :, None]).sum(1) / s0.clamp(min=1e-300)  # [L, k]
    e = (onehot * (x[None, :, None] - mu[:, None, :]) ** 2).sum((1, 2))
    return float(e.min())


@pytest.mark.parametrize("k", [2, 3])
def test_dp_is_optimal_against_brute_force(k):
    g = torch.Generator().manual_seed(k)
    X = torch.randn(6, 7, generator=g)
    X[0, 3] = X[0, 4]  # a duplicate value
    W = torch.rand(6, 7, generator=g) + 0.05
    for weights in (None, W):
        c = kmeans_1d_optimal(X, k, weights)
        got = sse(X, c, weights)
        for i in range(X.shape[0]):
            w = torch.ones(7) if weights is None else weights[i]
            ref = _brute_force_sse(X[i], w, k)
            assert got[i].item() == pytest.approx(ref, rel=1e-5, abs=1e-9)


def test_lloyd_never_worse_than_its_init_and_dp_bounds_everything():
    X = _heavy(64, 96, seed=1)
    for k in (2, 4, 8):
        opt = sse(X, kmeans_1d_optimal(X, k))
        for init in ("uniform", "quantile", "kmeans++", "dp"):
            r0 = kmeans_1d(X, k, init=init, max_iter=0)  # the initialisation itself
            r = kmeans_1d(X, k, init=init, tol=0)
            e0, e = sse(X, r0.centroids), sse(X, r.centroids)
            assert (e <= e0 * (1 + 1e-6) + 1e-12).all(), (init, k)
            assert (e >= opt * (1 - 1e-6) - 1e-12).all(), (init, k)  # nothing beats the optimum
        # the default (coarse-DP init) is close to the optimum on heavy-tailed vectors
        r = kmeans_1d(X, k)
        assert float((sse(X, r.centroids) / opt).mean()) <= 1.05


def test_lloyd_reaches_a_fixed_point():
    X = _heavy(32, 128, seed=2)
    r = kmeans_1d(X, 8, tol=0)
    # each centroid is the mean of its cluster (empty clusters excepted) and codes are nearest
    codes = r.codes
    assert torch.equal(codes, nearest(X, r.centroids))
    for i in range(32):
        for c in codes[i].unique():
            sel = codes[i] == c
            assert r.centroids[i, c].item() == pytest.approx(X[i, sel].double().mean().item(), rel=1e-5, abs=1e-8)


def test_kmeans_beats_uniform_min_max_grid():
    X = _heavy(128, 256, seed=3)
    for bits in (2, 3, 4):
        K = 2**bits
        lo, hi = X.min(1, keepdim=True).values, X.max(1, keepdim=True).values
        uniform = lo + (hi - lo) * torch.arange(K) / (K - 1)
        e_uni = sse(X, uniform)
        r = kmeans_1d(X, K, init=("dp", "uniform"))
        assert (sse(X, r.centroids) <= e_uni * (1 + 1e-6)).all()  # guaranteed: "uniform" is one of the inits
        assert float((sse(X, kmeans_1d(X, K).centroids) / e_uni).max()) <= 1.0 + 1e-6  # default: in practice


def test_weighted_kmeans_follows_the_weights():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(16, 200, generator=g)
    W = torch.ones(16, 200)
    W[:, :20] = 1000.0  # heavily weighted points must be represented well
    r_w = kmeans_1d(X, 4, W)
    r_u = kmeans_1d(X, 4)
    err_heavy = lambda c: sse(X[:, :20], c)  # noqa: E731
    assert (err_heavy(r_w.centroids) <= err_heavy(r_u.centroids) + 1e-9).all()
    assert float(err_heavy(r_w.centroids).sum()) < 0.7 * float(err_heavy(r_u.centroids).sum())  # measured 0.60
    # weighted DP is still optimal for the weighted objective
    opt = sse(X, kmeans_1d_optimal(X, 4, W), W)
    assert (sse(X, r_w.centroids, W) >= opt * (1 - 1e-6)).all()


def test_degenerate_vectors():
    X = torch.zeros(3, 10)
    X[1] = 1.0
    X[2, :3] = torch.tensor([1.0, 2.0, 3.0])  # fewer distinct values than k
    r = kmeans_1d(X, 8)
    assert torch.isfinite(r.centroids).all()
    assert float(sse(X, r.centroids).max()) == 0.0
    assert float(sse(X, kmeans_1d_optimal(X, 8)).max()) == 0.0
    c = kmeans_1d_optimal(torch.tensor([[3.0, 1.0]]), 4)  # m < k
    assert c.tolist() == [[1.0, 3.0, 3.0, 3.0]]


def test_deterministic_and_seeded():
    X = _heavy(16, 64, seed=5)
    a = kmeans_1d(X, 8, init="kmeans++", seed=3)
    b = kmeans_1d(X, 8, init="kmeans++", seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    torch.manual_seed(123)  # the global generator must not matter
    c = kmeans_1d(X, 8, init="kmeans++", seed=3)
    assert torch.equal(a.centroids, c.centroids)


@pytest.mark.parametrize("bad", [
    lambda: kmeans_1d(torch.zeros(4), 2),
    lambda: kmeans_1d(torch.zeros(2, 0), 2),
    lambda: kmeans_1d(torch.full((2, 3), float("nan")), 2),
    lambda: kmeans_1d(torch.zeros(2, 3), 0),
    lambda: kmeans_1d(torch.zeros(2, 3), 2, torch.full((2, 3), -1.0)),
    lambda: kmeans_1d(torch.zeros(2, 3), 2, torch.ones(3, 3)),
    lambda: kmeans_1d(torch.zeros(2, 3), 2, init="nope"),
    lambda: kmeans_1d(torch.zeros(2, 3), 2, centroids=torch.zeros(2, 3)),
])
def test_bad_input(bad):
    with pytest.raises(LowbitError):
        bad()


def test_one_vector_path_matches_the_batch():
    """`_fit_one` (one vector, CLAQ's in-sweep call) runs the batched algorithm's steps on 1-D arrays:
    the same centroids as fitting that vector inside a batch (where each vector stops on its own)."""
    X = _heavy(24, 200, seed=6)
    W = torch.rand(24, 200, generator=torch.Generator().manual_seed(6)) + 0.1
    for k in (1, 2, 4, 16):
        for weights in (None, W):
            batch = kmeans_1d(X, k, weights)
            for i in range(X.shape[0]):
                wi = None if weights is None else weights[i : i + 1]
                one = kmeans_1d(X[i : i + 1], k, wi)
                assert torch.allclose(one.centroids[0], batch.centroids[i], rtol=1e-6, atol=1e-9), (k, i)
                assert torch.equal(one.codes, nearest(X[i : i + 1], one.centroids))


def test_dp_chunks_and_many_clusters():
    from lowbit.methods import kmeans as km

    # the DP runs in chunks of vectors: identical to one vector at a time
    X = _heavy(km._DP_CHUNK * 2 + 5, 24, seed=7)
    whole = kmeans_1d_optimal(X, 3)
    rows = torch.cat([kmeans_1d_optimal(X[i : i + 1], 3) for i in range(X.shape[0])])
    assert torch.equal(whole, rows)
    # more clusters than the coarse DP has cut steps (31): the unrestricted recursion, still a valid start
    Y = _heavy(4, 300, seed=8)
    r0 = kmeans_1d(Y, 40, max_iter=0)
    r = kmeans_1d(Y, 40, tol=0)
    assert torch.isfinite(r0.centroids).all()
    assert (sse(Y, r.centroids) <= sse(Y, r0.centroids) * (1 + 1e-6)).all()
    assert (sse(Y, r.centroids) <= sse(Y, kmeans_1d(Y, 16).centroids)).all()  # more clusters, less error


def test_nearest_counts_midpoints_like_searchsorted():
    """`nearest` counts midpoints below x; the reference is torch.searchsorted (side="left"), with exact
    ties at midpoints (to the lower centroid) and duplicate centroids."""
    g = torch.Generator().manual_seed(9)
    X = _heavy(16, 300, seed=9)
    for k in (1, 2, 3, 8, 16, 32, 40):
        C = torch.sort(torch.randn(16, k, generator=g) * 0.05, 1).values
        if k > 2:
            C[:, 1] = C[:, 0]
        mids = (C[:, 1:] + C[:, :-1]) / 2
        Xt = X.clone()
        if k > 1:
            Xt[:, :4] = mids[:, -1:]  # exactly on a midpoint
        ref = torch.searchsorted(mids.contiguous(), Xt.contiguous(), side="left")
        assert torch.equal(nearest(Xt, C), ref), k


def _reference_dp_sse(x: list[float], k: int) -> float:
    """Textbook O(k·m²) 1-D k-means DP in Python floats: min SSE of k contiguous runs of sorted x."""
    x = sorted(x)
    m = len(x)

    def cost(a, t):  # SSE of x[a:t] about its mean
        seg = x[a:t]
        mu = sum(seg) / len(seg)
        return sum((v - mu) ** 2 for v in seg)

    D = [cost(0, t) if t else 0.0 for t in range(m + 1)]
    for _ in range(1, k):
        D = [min([D[t]] + [D[a] + cost(a, t) for a in range(1, t)]) if t else 0.0 for t in range(m + 1)]
    return D[m]


def test_packed_argmin_dp_against_a_textbook_dp():
    """The exact solver's DP packs the argmin into the low mantissa bits (`_dp_chunk`): its SSE equals a
    plain Python DP's on vectors long enough to need 6 index bits, with duplicate values."""
    X = _heavy(5, 40, seed=11)
    X[1, 10:14] = X[1, 3]
    for k in (2, 5, 9):
        got = sse(X, kmeans_1d_optimal(X, k))
        for i in range(X.shape[0]):
            ref = _reference_dp_sse(X[i].double().tolist(), k)
            assert got[i].item() == pytest.approx(ref, rel=1e-6, abs=1e-12), (k, i)


def test_sums_at_cuts_match_the_full_prefix_sums():
    """The coarse init's Σx² at the cuts (one reduceat) against cumsum-then-take, with repeated cuts."""
    import numpy as np

    from lowbit.methods.kmeans import _sums_at_cuts

    rng = np.random.default_rng(12)
    v = rng.standard_normal((6, 50)) ** 2
    inner = np.sort(rng.integers(0, 50, (6, 9)), axis=1)
    inner[2, 3:6] = inner[2, 3]  # repeated cuts: empty segments
    inner[3, :4] = 0
    cut = np.concatenate([np.zeros((6, 1), int), inner, np.full((6, 1), 50)], axis=1)
    full = np.concatenate([np.zeros((6, 1)), np.cumsum(v, 1)], axis=1)
    np.testing.assert_allclose(_sums_at_cuts(v, cut), np.take_along_axis(full, cut, 1), rtol=1e-12, atol=1e-12)
