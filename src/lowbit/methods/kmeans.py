"""1-D k-means for codebook quantizers (CLAQ per column, SqueezeLLM per row), batched over vectors.

Every routine takes a batch X [n, m] — n independent vectors (columns of a layer, or rows) of m values —
and fits k centroids per vector, optionally weighted (Σ_i w_i (x_i − c(x_i))², SqueezeLLM's Fisher weights).

Lloyd in 1-D on sorted values with prefix sums (the idea behind flash1dkmeans): with centroids sorted,
the clusters are contiguous runs of the sorted values separated by the midpoints between neighbouring
centroids, so one Lloyd step is

    b_i = #{x ≤ (c_i + c_{i+1})/2}            (searchsorted, O(k log m))
    c_i = (P1[b_i] − P1[b_{i−1}]) / (P0[b_i] − P0[b_{i−1}])      P0 = cumsum w, P1 = cumsum w·x

— O(k log m) per vector and iteration instead of O(k·m); the O(m log m) sort is paid once. Lloyd has
converged exactly when no boundary b_i moves (then the centroids are a fixed point), so iterations stop
when every vector's boundaries are unchanged, or at `max_iter`. Each step never increases the weighted
SSE (assignment to the nearest centroid, then the mean of each cluster), so the result is never worse
than its initialisation. Ties (x exactly at a midpoint) go to the lower centroid, everywhere.

`kmeans_1d_optimal` is the exact solution by dynamic programming over sorted values (optimal 1-D
clusters are contiguous in sorted order): O(k·m²) per vector, the quality reference for small m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lowbit.errors import LowbitError

Init = Literal["dp", "uniform", "quantile", "kmeans++"]


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [n, k] float32, ascending per vector
    codes: torch.Tensor  # [n, m] int64, index of the nearest centroid
    iterations: int  # Lloyd steps taken by the slowest vector


def _check(X: torch.Tensor, k: int, weights: torch.Tensor | None, values: bool = True) -> None:
    """Shapes, k, weights; and (values=True) finite values. kmeans_1d checks its values on the sorted
    rows instead (`_check_sorted`: two entries per row, not a pass over [n, m])."""
    if X.ndim != 2:
        raise LowbitError(f"k-means: expected a batch [n, m] of vectors, got shape {tuple(X.shape)}")
    if not 1 <= k <= 256:
        raise LowbitError(f"k-means: k = {k} clusters is out of range [1, 256]")
    if X.shape[1] == 0:
        raise LowbitError("k-means: vectors are empty")
    # min and max are NaN or ±inf exactly when some x is (one reduction, no [n, m] temporary)
    if values and X.numel() and not torch.isfinite(torch.stack(torch.aminmax(X.detach()))).all():
        raise LowbitError("k-means: NaN/inf values")
    if weights is not None:
        if weights.shape != X.shape:
            raise LowbitError(f"k-means: weights shape {tuple(weights.shape)} != values shape {tuple(X.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise LowbitError("k-means: weights must be finite and non-negative")


def _check_sorted(xs: np.ndarray) -> None:
    """numpy sorts NaN last and ±inf to the ends: a row has a non-finite value iff an end is one."""
    if not np.isfinite(xs[..., [0, -1]]).all():
        raise LowbitError("k-means: NaN/inf values")


def nearest(X: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (ascending centroids [n, k], values [n, m]); ties to the lower one.

    code = #{midpoints < x} (= searchsorted(mids, x, side="left")). Up to 32 centroids it is counted
    with k − 1 broadcast comparisons (~15× faster than torch's batched searchsorted on CPU, which is
    branchy per element)."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    if mids.shape[1] > 31 or X.device.type != "cpu":
        return torch.searchsorted(mids.contiguous(), X.contiguous(), side="left")
    Xn, Mn = X.detach().numpy(), mids.detach().numpy()
    count = np.zeros(Xn.shape, dtype=np.uint8)
    below = np.empty(Xn.shape, dtype=bool)
    for j in range(Mn.shape[1]):
        np.less(Mn[:, j : j + 1], Xn, out=below)
        count += below
    return torch.from_numpy(count.astype(np.int64))


def _prefix(v: np.ndarray) -> np.ndarray:
    """Row prefix sums [n, m + 1] (leading 0) in float64. torch's cumsum runs the rows side by side in
    SIMD lanes, ~4× numpy's row-by-row loop; the additions happen in the same order (bit-identical)."""
    out = torch.empty((v.shape[0], v.shape[1] + 1), dtype=torch.float64)
    out[:, 0] = 0
    torch.cumsum(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)), 1, out=out[:, 1:])
    return out.numpy()


class _RowSearch:
    """Batched searchsorted over the rows of a row-sorted xs [n, m] (numpy's is 1-D): rows are shifted
    apart by a power of two above 4·max|value|, so one global sorted array answers every row. The shift
    is exact for float32 data except below ~2^-30 of the shift, where neighbouring values may tie
    (harmless for Lloyd; final codes come from `nearest`)."""

    def __init__(self, xs: np.ndarray):
        n, self.m = xs.shape
        amax = float(np.abs(xs[:, [0, -1]]).max())  # rows are sorted: the largest |x| is at an end
        self.C = 2.0 ** (np.ceil(np.log2(max(amax, 1e-30))) + 2)
        self.off = (np.arange(n, dtype=np.float64) * self.C)[:, None]
        self.base = (np.arange(n) * self.m)[:, None]
        self.flat = (xs + self.off).ravel()

    def __call__(self, q: np.ndarray, side: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Per row i (or rows[i]), the insertion points of q[i] in that row."""
        off, base = (self.off, self.base) if rows is None else (self.off[rows], self.base[rows])
        return np.searchsorted(self.flat, (q + off).ravel(), side=side).reshape(q.shape) - base


def _sorted(X: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Row-sorted values (float64) and their weights (None: unit weights). numpy's row sort is ~10×
    faster than torch's on CPU."""
    if weights is None:
        return np.sort(X, axis=1).astype(np.float64), None
    order = np.argsort(X, axis=1, kind="stable")
    return np.take_along_axis(X, order, 1).astype(np.float64), np.take_along_axis(weights, order, 1).astype(np.float64)


def _init_quantile(xs: np.ndarray, P0: np.ndarray, k: int) -> np.ndarray:
    """c_i = the weighted (i + ½)/k quantile of each vector (deterministic)."""
    q = (np.arange(k) + 0.5) / k * P0[:, -1:]
    idx = np.minimum(_RowSearch(P0[:, 1:])(q, "left"), xs.shape[1] - 1)
    return np.take_along_axis(xs, idx, 1)


def _init_uniform(xs: np.ndarray, k: int) -> np.ndarray:
    """The min-max uniform grid's k levels: Lloyd from here is never worse than uniform quantization."""
    lo, hi = xs[:, :1], xs[:, -1:]
    return lo + (hi - lo) * (np.arange(k) / max(k - 1, 1))


def _init_kmeanspp(xs: np.ndarray, ws: np.ndarray, k: int, gen: torch.Generator) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's variant): each step draws 2 + ⌊ln k⌋
    candidates ∝ w·D² (D = distance to the nearest centroid so far) and keeps the one that lowers
    Σ w·D² most. Draws from a seeded torch generator (numpy's global state is never touched)."""
    n, m = xs.shape
    L = 2 + int(np.log(k))
    rows = np.arange(n)

    def draw(p: np.ndarray, count: int) -> np.ndarray:
        p = p + (p.sum(1, keepdims=True) == 0)  # all-zero mass (fewer distinct values than k): any point
        return torch.multinomial(torch.from_numpy(p), count, replacement=True, generator=gen).numpy()

    C = np.empty((n, k))
    C[:, 0] = xs[rows, draw(ws, 1)[:, 0]]
    d2 = (xs - C[:, :1]) ** 2
    for i in range(1, k):
        cand = np.take_along_axis(xs, draw(ws * d2, L), 1)  # [n, L]
        d2c = np.minimum(d2[:, None, :], (xs[:, None, :] - cand[:, :, None]) ** 2)  # [n, L, m]
        best = (d2c * ws[:, None, :]).sum(2).argmin(1)
        C[:, i] = cand[rows, best]
        d2 = d2c[rows, best]
    return np.sort(C, axis=1)


def kmeans_1d(X: torch.Tensor, k: int, weights: torch.Tensor | None = None, *,
              init: Init | tuple[Init, ...] = "dp", max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
              centroids: torch.Tensor | None = None) -> KMeansResult:
    """Weighted Lloyd k-means of every row of X [n, m] (float), k clusters each.

    init: one or several of "dp" (the optimal clustering restricted to a few candidate cuts, see
    `_init_coarse_dp`; deterministic, the default), "uniform" (the min-max grid's levels), "quantile"
    (weighted (i+½)/k quantiles) and "kmeans++" (greedy, seeded with `seed`). With several, Lloyd runs
    from each (as one batch) and each vector keeps its lowest-SSE result, never worse than any of them.
    Or explicit starting `centroids` [n, k].

    Each vector's Lloyd stops on its own (finished vectors leave the batch): when none of its cluster
    boundaries moves (an exact fixed point), when Σ (centroid shift)² ≤ tol · its variance
    (scikit-learn's criterion and default; tol = 0 runs to the exact fixed point), or after max_iter
    steps. Arithmetic in float64 (numpy: far less per-call overhead than torch); centroids returned in
    float32. One vector with the default init takes `_fit_one` (the same arithmetic on 1-D arrays, without
    the batching machinery: CLAQ's in-sweep refit calls this once per column).
    """
    _check(X, k, weights, values=False)
    n, m = X.shape
    Xn = X.detach().float().cpu().numpy()
    Wn = None if weights is None else weights.detach().float().cpu().numpy()
    if n == 1 and centroids is None and init == "dp":
        c, it, codes = _fit_one(Xn[0], None if Wn is None else Wn[0], k, max_iter, tol)
        return KMeansResult(torch.from_numpy(c)[None], torch.from_numpy(codes)[None], it)
    xs, ws = _sorted(Xn, Wn)
    _check_sorted(xs)
    search = _RowSearch(xs)
    if Wn is None:  # unit weights: Σ1 = the count, exactly; no multiplications by 1
        P0, P1 = np.broadcast_to(np.arange(m + 1, dtype=np.float64), (n, m + 1)), _prefix(xs)
    else:
        P0, P1 = _prefix(ws), _prefix(ws * xs)
    if centroids is not None:
        if tuple(centroids.shape) != (n, k):
            raise LowbitError(f"k-means: initial centroids shape {tuple(centroids.shape)}, expected {(n, k)}")
        starts = [np.sort(centroids.detach().double().cpu().numpy(), axis=1)]
    else:
        starts = []
        for name in (init,) if isinstance(init, str) else init:
            if name == "dp":
                starts.append(_init_coarse_dp(xs, ws, P0, P1, k, search))
            elif name == "uniform":
                starts.append(_init_uniform(xs, k))
            elif name == "quantile":
                starts.append(_init_quantile(xs, P0, k))
            elif name == "kmeans++":
                starts.append(_init_kmeanspp(xs, np.ones_like(xs) if ws is None else ws, k,
                                             torch.Generator().manual_seed(seed)))
            else:
                raise LowbitError(f"k-means: unknown init {name!r}")
        if not starts:
            raise LowbitError("k-means: no initialisation given")
    I = len(starts)
    c = np.concatenate(starts)
    if I > 1:  # the inits run as one batch of I·n vectors
        xs, P0, P1 = np.tile(xs, (I, 1)), np.tile(P0, (I, 1)), np.tile(P1, (I, 1))
    N = I * n
    # scikit-learn's tolerance: stop when Σ_i (centroid shift)² ≤ tol · variance of the vector.
    tol_abs = tol * _variance(xs)
    if I > 1:
        search = _RowSearch(xs)
    c = np.ascontiguousarray(c, dtype=np.float64)
    # Steps run on a working set of vectors with the finished ones masked out; the set is compacted
    # whenever fewer than half of it still iterate (most vectors stop after 2-6 steps, a few take 10+),
    # so a step costs O(live vectors) without re-indexing every step. Cluster sums are one flat gather.
    flat0, flat1 = (None if Wn is None else np.ascontiguousarray(P0).ravel()), np.ascontiguousarray(P1).ravel()
    B = np.empty((N, k + 1), dtype=np.int64)
    B[:, 0], B[:, -1] = 0, m
    ids = np.arange(N)  # the working set; c[ids] is held in cw while it is worked on
    cw, row, tol_w = c, ids[:, None] * (m + 1), tol_abs
    live = np.ones(N, dtype=bool)  # per working vector: still iterating (each stops on its own)
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        b = search((cw[:, 1:] + cw[:, :-1]) / 2, "right", None if ids.size == N else ids)
        if prev is not None:
            live &= (b != prev).any(1)  # no boundary moved: an exact fixed point, done
            if not live.any():
                it -= 1
                break
        prev = b
        Bw = B[: ids.size]
        Bw[:, 1:-1] = b  # values ≤ mid go to the lower cluster
        G1 = flat1[row + Bw]
        S1 = G1[:, 1:] - G1[:, :-1]
        if flat0 is None:
            S0 = (Bw[:, 1:] - Bw[:, :-1]).astype(np.float64)  # unit weights: Σ1 = the count
        else:
            G0 = flat0[row + Bw]
            S0 = G0[:, 1:] - G0[:, :-1]
        empty = S0 <= 0
        new = S1 / np.where(empty, 1.0, S0)
        if empty.any():  # an empty cluster keeps its centroid; keep the order
            new = np.sort(np.where(empty, cw, new), axis=1)
        shift2 = ((new - cw) ** 2).sum(1)
        cw = np.where(live[:, None], new, cw)
        if tol > 0:
            live &= shift2 > tol_w
        if 2 * np.count_nonzero(live) < ids.size:
            c[ids] = cw
            ids, cw, row, tol_w, prev = ids[live], cw[live], row[live], tol_w[live], prev[live]
            live = np.ones(ids.size, dtype=bool)
            if ids.size == 0:
                break
    c[ids] = cw
    if I > 1:
        Xr = np.tile(Xn, (I, 1))
        e = torch.from_numpy(Xr), torch.from_numpy(c).float()
        err = sse(e[0], e[1], None if weights is None else weights.repeat(I, 1)).view(I, n).numpy()
        best = err.argmin(0)  # first init wins ties: deterministic
        c = c.reshape(I, n, k)[best, np.arange(n)]
    cent = torch.from_numpy(np.ascontiguousarray(c)).float()
    return KMeansResult(cent, nearest(X.float(), cent), it)


def _variance(xs: np.ndarray) -> np.ndarray:
    """Row variances (unweighted, as scikit-learn's tolerance) as E[x²] − E[x]², clamped at 0: two
    fused row reductions instead of np.var's four passes; the cancellation (~1e-16·mean²/var relative)
    is immaterial for a stopping tolerance."""
    m = xs.shape[1]
    return np.maximum(np.einsum("ij,ij->i", xs, xs) / m - (xs.sum(1) / m) ** 2, 0.0)


_COUNT_CUTS: dict[tuple[int, int], np.ndarray] = {}
_COARSE = 16  # the coarse DP's cuts: h = max(16, k) equal-count segments and an h-step value grid


def _fit_one(x: np.ndarray, w: np.ndarray | None, k: int, max_iter: int, tol: float):
    """kmeans_1d(x[None], k, init="dp") for one float32 vector x [m]: (centroids float32 [k], Lloyd steps,
    codes int64 [m]). Same steps as the batched path on 1-D arrays (numpy's 1-D searchsorted instead of
    the shifted-rows search, plain indexing instead of take_along_axis): per call ~40 numpy calls
    instead of ~200, which is what a one-column call costs."""
    m = x.size
    if w is None:
        xs = np.sort(x).astype(np.float64)
        ws = np.ones(m)
        wx = xs
    else:
        o = np.argsort(x, kind="stable")
        xs, ws = x[o].astype(np.float64), w[o].astype(np.float64)
        wx = ws * xs
    _check_sorted(xs)
    P0, P1 = np.zeros(m + 1), np.zeros(m + 1)
    np.cumsum(ws, out=P0[1:])
    np.cumsum(wx, out=P1[1:])
    # coarse-DP start (`_init_coarse_dp`)
    h = max(_COARSE, k)  # 2h − 1 cut steps ≥ k clusters: no empty (duplicate) starting centroids
    if (m, h) not in _COUNT_CUTS:
        _COUNT_CUTS[m, h] = np.round(np.linspace(0, m, h + 1)).astype(np.int64)
    lo, hi = xs[0], xs[-1]
    # ≤ m − 1 (only a constant vector reaches m): every cut before the end starts a segment in the row
    by_value = np.minimum(np.searchsorted(xs, lo + (hi - lo) * (np.arange(1, h) / h), "right"), m - 1)
    cut = np.sort(np.concatenate([_COUNT_CUTS[m, h], by_value]))
    P2 = np.zeros(m + 1)
    np.cumsum(xs * xs if w is None else wx * xs, out=P2[1:])
    C0, C1, *dp_in = _cut_costs(xs, P0, P1, P2[cut], cut)
    st, en = _dp_segments(*(a[None] for a in dp_in), k)
    st, en = st[0], en[0]
    s0, s1 = C0[en] - C0[st], C1[en] - C1[st]
    c = np.sort(np.where(s0 > 0, s1 / np.where(s0 > 0, s0, 1.0), xs[np.minimum(cut[st], m - 1)]))
    # Lloyd (see kmeans_1d)
    tol_abs = tol * xs.var()
    prev = None
    B = np.empty(k + 1, dtype=np.int64)
    B[0], B[-1] = 0, m
    it = 0
    for it in range(1, max_iter + 1):
        b = np.searchsorted(xs, (c[1:] + c[:-1]) / 2, "right")
        if prev is not None and np.array_equal(b, prev):
            it -= 1
            break
        prev = b
        B[1:-1] = b
        G0, G1 = P0[B], P1[B]
        S0, S1 = G0[1:] - G0[:-1], G1[1:] - G1[:-1]
        empty = S0 <= 0
        if empty.any():
            new = np.sort(np.where(empty, c, S1 / np.where(empty, 1.0, S0)))
        else:
            new = S1 / S0
        d = new - c
        c = new
        if tol > 0 and d @ d <= tol_abs:
            break
    c32 = c.astype(np.float32)
    codes = np.searchsorted((c32[1:] + c32[:-1]) / np.float32(2), x, "left")  # = `nearest`
    return c32, it, codes


def sse(X: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-vector Σ w (x − nearest centroid)² in float64, [n]."""
    q = centroids.double().gather(1, nearest(X.float(), centroids.float()))
    e = (X.double() - q).square()
    return (e if weights is None else e * weights.double()).sum(1)


_DP_CHUNK = 128  # vectors per DP pass: keeps its [M+1, M+1, chunk] work arrays in cache (~2× at M = 31)


def _dp_segments(P0: np.ndarray, P1: np.ndarray, P2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`_dp_chunk` over chunks of `_DP_CHUNK` vectors (rows are independent: identical results)."""
    n, M1 = P0.shape
    ch = max(1, min(_DP_CHUNK, (1 << 17) // (M1 * M1)))  # ≤ 1 MiB per float64 work array
    if n <= ch:
        return _dp_chunk(P0, P1, P2, k)
    parts = [_dp_chunk(P0[i : i + ch], P1[i : i + ch], P2[i : i + ch], k) for i in range(0, n, ch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _dp_chunk(P0: np.ndarray, P1: np.ndarray, P2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-segmentation of sorted weighted points with prefix sums P* [n, M+1] at the allowed cut
    positions 0 = p_0 ≤ … ≤ p_M = m. Returns (start, end) cut indices [n, k] into P*.

    D_j[t] = min_{a<t} D_{j−1}[a] + cost(a, t), cost(a, t) = S2 − S1²/S0 over the points between cuts a
    and t (their weighted SSE about their mean), built in place (7 passes over n·(M+1)²).

    Layout [a, t, n], the vectors innermost, and a packed argmin: every candidate sum is ≥ 0 (or +inf),
    so its IEEE bits order like the value as an integer; with the low ⌈log2(M+1)⌉ mantissa bits replaced
    by a, one integer minimum over the a axis (element-wise over whole [t, n] planes: SIMD, no per-row
    calls) yields both the minimum — truncated by < 2^−(mantissa − index bits) relative: 2^−18 for the
    float32 coarse init at M = 31, ~2^−42 for the float64 exact solver — and its first position a.
    Arithmetic in the dtype of P* (float64 for the exact solver, float32 for the coarse init)."""
    n, M1 = P0.shape
    P0, P1, P2 = (np.ascontiguousarray(P.T) for P in (P0, P1, P2))  # [M1, n]
    S0 = P0[None, :, :] - P0[:, None, :]  # [a, t, n]
    S1 = P1[None, :, :] - P1[:, None, :]
    cost = P2[None, :, :] - P2[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.multiply(S1, S1, out=S1)
        np.divide(S1, S0, out=S1)
    np.subtract(cost, S1, out=cost)
    # one fmax against [a, t] = 0 (a < t) / +inf (a ≥ t, no such segment): NaN (0/0, an empty segment)
    # and round-off negatives become cost 0, and the impossible segments +inf
    np.fmax(cost, _floor(M1, cost.dtype)[:, :, None], out=cost)
    ints = np.int32 if cost.dtype == np.float32 else np.int64
    low = ints((1 << max(1, int(M1 - 1).bit_length())) - 1)  # room for the index a
    D = cost[0]  # D_0[t]: one cluster over everything before cut t, [t, n]
    back = []  # per layer j: (t0, a0, arg), D_j[t] attained at a = a0 + arg[t − t0]
    buf = np.empty(M1 * M1 * n, dtype=cost.dtype)  # every layer's [A, T, n] sums, contiguous
    for j in range(1, k):
        if k <= M1 - 1:
            # D_{j−1}[a] is finite only for a ≥ j (j clusters need j steps of cut), so layer j needs
            # a ≥ j, t ≥ j + 1, and the last layer only t = M (the end). Symmetrically, the k − 1 − j
            # clusters still to come need a cut step each: t ≤ M − (k − 1 − j). ~half the work at
            # k = 16, M = 31; and layer j − 1's t-range is exactly layer j's a-range [j, t1).
            t0, t1, a0 = (j + 1 if j < k - 1 else M1 - 1), M1 - 1 - (k - 1 - j), j
            Da = D[j:t1] if j == 1 else D
        else:  # more clusters than cut steps: some segments are empty; the plain recursion
            t0, t1, a0, Da = 0, M1 - 1, 0, D
        A, T = Da.shape[0], t1 + 1 - t0
        V = buf[: A * T * n].reshape(A, T, n)
        np.add(Da[:, None, :], cost[a0 : a0 + A, t0 : t1 + 1], out=V)
        Vi = V.view(ints)
        np.bitwise_and(Vi, ~low, out=Vi)
        np.bitwise_or(Vi, np.arange(A, dtype=ints)[:, None, None], out=Vi)
        best = np.minimum.reduce(Vi, axis=0)  # [T, n]
        back.append((t0, a0, best & low))
        D = (best & ~low).view(cost.dtype)
    starts = np.empty((n, k), dtype=np.int64)
    ends = np.empty((n, k), dtype=np.int64)
    t = np.full(n, M1 - 1, dtype=np.int64)
    rows = np.arange(n)
    for j in range(k - 1, -1, -1):
        ends[:, j] = t
        if j > 0:
            t0, a0, arg = back[j - 1]
            t = arg[t - t0, rows].astype(np.int64) + a0
        else:
            t = np.zeros(n, dtype=np.int64)
        starts[:, j] = t
    return starts, ends


_FLOOR: dict[tuple[int, np.dtype], np.ndarray] = {}


def _floor(M1: int, dtype) -> np.ndarray:
    """[a, t] = 0 where a < t, +inf where a ≥ t (no such segment); cached per size and dtype."""
    key = (M1, np.dtype(dtype))
    if key not in _FLOOR:
        _FLOOR[key] = np.where(np.triu(np.ones((M1, M1), dtype=bool), 1), 0.0, np.inf).astype(dtype)
    return _FLOOR[key]


def _segment_means(xs, P0, P1, starts, ends, cut) -> np.ndarray:
    """Centroids of the segments [cut[start], cut[end]) (an empty segment: the value at its start)."""
    g = lambda P, i: np.take_along_axis(P, i, 1)  # noqa: E731
    s0, s1 = g(P0, ends) - g(P0, starts), g(P1, ends) - g(P1, starts)
    at = np.minimum(g(cut, starts), xs.shape[1] - 1)
    return np.sort(np.where(s0 > 0, s1 / np.where(s0 > 0, s0, 1.0), g(xs, at)), axis=1)


def _cut_costs(xs: np.ndarray, P0: np.ndarray, P1: np.ndarray, C2: np.ndarray, cut: np.ndarray):
    """The coarse DP's inputs at the cuts: (count, Σ w·u, Σ w·u²) prefixes in float32, where
    u = (x − mean)/range. Centred and scaled in float64 at the cuts only (expanding Σ w(x − μ)² from the
    raw prefix sums P* = Σw, Σwx and C2 = Σwx² at the cuts), then rounded: float32 halves the DP's
    memory traffic, and a start only needs to be near the optimum (Lloyd finishes it). Rows of xs, or
    one 1-D vector."""
    lo, hi = xs[..., :1], xs[..., -1:]
    mu, r = P1[..., -1:] / P0[..., -1:], np.maximum(hi - lo, 1e-30)  # the weighted mean: any centre will do
    take = (lambda P: np.take_along_axis(P, cut, -1)) if xs.ndim == 2 else (lambda P: P[cut])
    C0, C1 = take(P0), take(P1)
    Q1 = (C1 - mu * C0) / r
    Q2 = (C2 - 2 * mu * C1 + mu * mu * C0) / (r * r)
    return C0, C1, C0.astype(np.float32), Q1.astype(np.float32), Q2.astype(np.float32)


def _sums_at_cuts(v: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """Prefix sums of the rows of v [n, m] at the sorted positions cut [n, M+1] (cut[:, 0] = 0,
    cut[:, 1:-1] < m, cut[:, -1] = m): segment sums by one reduceat over the flat rows, then a cumsum
    over the M segments, instead of a full [n, m + 1] prefix-sum pass. (reduceat returns v[i] for an
    empty segment i = j: zeroed; a row's last segment ends where the next row starts.)"""
    n, m = v.shape
    start = cut[:, :-1] + (np.arange(n) * m)[:, None]  # all < m: see the by-value cuts
    seg = np.add.reduceat(v.reshape(-1), start.reshape(-1)).reshape(n, -1)
    seg[cut[:, 1:] == cut[:, :-1]] = 0
    out = np.zeros(cut.shape)
    np.cumsum(seg, 1, out=out[:, 1:])
    return out


def _init_coarse_dp(xs: np.ndarray, ws: np.ndarray | None, P0: np.ndarray, P1: np.ndarray, k: int,
                    search: "_RowSearch") -> np.ndarray:
    """Optimal k-means restricted to cuts at h = max(16, k) equal-count positions and h − 1 positions of
    a uniform value grid (the latter isolate sparse tails): exact SSE of every allowed segmentation from
    the prefix sums, O(k·cuts²) per vector, so Lloyd starts next to the global optimum."""
    n, m = xs.shape
    h = max(_COARSE, k)  # 2h − 1 cut steps ≥ k clusters: no empty (duplicate) starting centroids
    by_count = np.broadcast_to(np.round(np.linspace(0, m, h + 1)).astype(np.int64), (n, h + 1))
    lo, hi = xs[:, :1], xs[:, -1:]
    # ≤ m − 1 (only a constant vector reaches m): every cut before the end starts a segment in the row
    by_value = np.minimum(search(lo + (hi - lo) * (np.arange(1, h) / h), "right"), m - 1)
    cut = np.sort(np.concatenate([by_count, by_value], axis=1), axis=1)
    C0, C1, *dp_in = _cut_costs(xs, P0, P1, _sums_at_cuts(xs * xs if ws is None else ws * xs * xs, cut), cut)
    starts, ends = _dp_segments(*dp_in, k)
    return _segment_means(xs, C0, C1, starts, ends, cut)


def kmeans_1d_optimal(X: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Globally optimal weighted 1-D k-means centroids [n, k] (ascending) by DP over sorted values
    (optimal 1-D clusters are contiguous in sorted order; optimal up to ~2^−40 relative, the packed
    argmin of `_dp_chunk`). O(k·m²) time and n·(m+1)² doubles of memory: the quality reference for m up
    to a few hundred."""
    _check(X, k, weights)
    n, m = X.shape
    if m <= k:  # every value its own centroid; pad with the largest
        xs = X.float().sort(dim=1).values
        return torch.cat([xs, xs[:, -1:].expand(n, k - m)], dim=1)
    xs, ws = _sorted(X.detach().double().cpu().numpy(), None if weights is None else weights.detach().double().cpu().numpy())
    ws = np.ones_like(xs) if ws is None else ws
    P0, P1, P2 = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)
    starts, ends = _dp_segments(P0, P1, P2, k)
    cut = np.broadcast_to(np.arange(m + 1), (n, m + 1))
    return torch.from_numpy(_segment_means(xs, P0, P1, starts, ends, cut)).float()
