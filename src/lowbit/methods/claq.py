"""CLAQ (Wang et al., arXiv 2405.17233): column-level k-means codebooks inside the GPTQ sweep.

As the authors implement it, for W [out, in] and H = (2/N) Σ xxᵀ:

1. GPTQ set-up: dead inputs zeroed, act-order, dampening, U = upper Cholesky factor of H⁻¹.
2. Outlier Order (on the dead-fixed, permuted, not yet updated W): c_j = #{i : |W_ij| ≥ t · mean|W|},
   μ over the whole matrix, t = 13. Columns are ranked by c_j, descending; ties go to the earlier sweep
   column (larger H_jj under act-order) — the authors' torch.sort leaves ties unspecified. The
   alternative metric ranks by the OBS saliency Σ_i W_ij² / U_jj² (the weight GPTQ's loss gives column j).
3. AP: the top round(f·in) ranked columns get `high_bits`, the rest `bits`, f = (T − bits)/(high − bits)
   (T = 2.1, bits 2, high 4: 5% of the columns at 4 bits; mean code width = T up to rounding).
4. OR: per column a fraction p per tail of the entries is kept in fp16 (dynamic: p = 1.4% for the top 10%
   ranked columns, 0.4% for the others). The authors' index logic keeps, in a column of n entries, the
   round(n·p) + 1 largest and the n − round(n·(1 − p)) smallest *signed* values; we take exactly those
   counts by rank (stable), on the column as updated by the sweep, like them.
5. The sweep (`gptq.gptq_sweep`): for each column in order, fit 2^b_j k-means centroids on the column as
   it is *now* (after the error feedback of every earlier column), including the entries OR will keep
   (as the authors do); snap to the nearest centroid of the stored (fp16 or uint8-affine) codebook; OR
   entries keep their fp16 value; push the error on the remaining columns as GPTQ does.

`row_scale` ("rms" | "absmax", an extension beyond the paper, default off): W = diag(s)·W' with one fp16
scale per output row (its RMS or absmax over the dead-fixed W), and the codebooks are fitted on W' so a
column's table need not follow the rows' magnitudes (GPTQ's per-row scales capture those; a per-column
table alone cannot). ŵ[r, c] = s_r · C_c[q]. GPTQ's loss of column j, Σ_r (w_r − ŵ_r)² / U_jj², is
Σ_r s_r² (w'_r − C_c[q_r])² / U_jj², so the k-means on w' is weighted by s_r², and the nearest entry of
w'_r is the nearest of w_r. The sweep itself (error and OBS update) stays in the original space.

`fit="block"` is a faster, non-faithful variant: the codebooks of a whole lazy block (128 columns) are
fitted in one batched k-means call on the block as the sweep reaches it, so earlier columns of the same
block no longer move later columns' codebooks (their codes still see the feedback).
"""

from __future__ import annotations

import math

import torch

from lowbit.formats.codebook import encode_codebook, make_codebook_grid
from lowbit.formats.quantized_weight import Outliers, QuantizedWeight
from lowbit.methods.config import ClaqConfig
from lowbit.methods.gptq import gptq_sweep, sweep_operands
from lowbit.methods.kmeans import kmeans_1d, nearest

DYNAMIC_TOP_COLUMNS, DYNAMIC_HIGH_P, DYNAMIC_LOW_P = 0.10, 0.014, 0.004


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def outlier_counts(W: torch.Tensor, t: float) -> torch.Tensor:
    """Outlier Order: per column, #{i : |W_ij| ≥ t · mean|W|} (mean over the whole matrix)."""
    A = W.abs()
    return (A >= t * A.mean()).sum(0)


def column_ranking(W: torch.Tensor, U: torch.Tensor, metric: str, t: float) -> torch.Tensor:
    """Columns (sweep order) from most to least sensitive; ties to the earlier sweep column."""
    if metric == "outlier-order":
        score = outlier_counts(W, t).double()
    else:  # OBS saliency of the column: the weight GPTQ's loss Σ (w − q)² / U_jj² gives it
        score = W.double().square().mean(0) / torch.diagonal(U).double().square()
    return torch.sort(-score, stable=True).indices


def adaptive_bits(order: torch.Tensor, cfg: ClaqConfig) -> torch.Tensor:
    """Code width per sweep column (uint8): the top round(f·n) ranked columns at high_bits."""
    n = order.numel()
    bits = torch.full((n,), cfg.bits, dtype=torch.uint8)
    if cfg.target_bits is not None:
        f = (cfg.target_bits - cfg.bits) / (cfg.high_bits - cfg.bits)
        bits[order[: _round_half_up(f * n)]] = cfg.high_bits
    return bits


def outlier_fractions(order: torch.Tensor, cfg: ClaqConfig) -> torch.Tensor:
    """Per sweep column, the fraction p per tail kept in full precision."""
    n = order.numel()
    if cfg.outliers == "none":
        return torch.zeros(n, dtype=torch.float64)
    if cfg.outliers == "dynamic":
        p = torch.full((n,), DYNAMIC_LOW_P, dtype=torch.float64)
        p[order[: _round_half_up(DYNAMIC_TOP_COLUMNS * n)]] = DYNAMIC_HIGH_P
        return p
    return torch.full((n,), float(cfg.outliers), dtype=torch.float64)


def tail_counts(n: int, p: float) -> tuple[int, int]:
    """(# largest, # smallest) entries the authors' index logic keeps for fraction p per tail."""
    if p <= 0:
        return 0, 0
    return min(n, round(n * p) + 1), n - round(n * (1 - p))


def outlier_tails(order: torch.Tensor, cfg: ClaqConfig, rows: int) -> list[tuple[int, int]]:
    """Per sweep column, (# largest, # smallest) entries kept in fp16: the authors' fractions
    (`tail_counts`), or `outlier_count` of each tail, at most half the column each (lowbit's extension:
    their index rounding keeps at least one largest entry and cannot keep exactly one per tail)."""
    if cfg.outlier_count:
        c = min(cfg.outlier_count, rows // 2)
        return [(c, c)] * order.numel()
    return [tail_counts(rows, p) for p in outlier_fractions(order, cfg).tolist()]


class ClaqColumnGrid:
    """`ColumnGrid` for `gptq_sweep`: a k-means codebook per column, fitted on the updated column."""

    def __init__(self, col_bits: torch.Tensor, col_tails: list[tuple[int, int]], cfg: ClaqConfig,
                 row_scale: torch.Tensor | None = None):
        self.cfg = cfg
        self.row_scale = row_scale  # fp16 [rows] or None
        self._s = None if row_scale is None else row_scale.float()
        self._s2 = None if row_scale is None else self._s.square()
        self.col_bits, self.col_tails = col_bits, col_tails
        self._bits = col_bits.tolist()  # python ints: per-column lookups without tensor overhead
        n = col_bits.numel()
        self.K = 2 ** int(col_bits.max())
        self.lut = torch.zeros(n, self.K, dtype=torch.float16)
        affine = cfg.codebook_bits != 16
        self.entries = torch.zeros(n, self.K, dtype=torch.uint8) if affine else None
        self.entry_scale = torch.zeros(n, dtype=torch.float16) if affine else None
        self.entry_min = torch.zeros(n, dtype=torch.float16) if affine else None
        self.group_size = cfg.block_size if cfg.fit == "block" else 0  # "block": start_group fits a block
        self._out_rows: list[torch.Tensor] = []
        self._out_cols: list[int] = []
        self._out_vals: list[torch.Tensor] = []

    def _fit(self, X: torch.Tensor, j0: int) -> None:
        """Fit and store the codebooks of sweep columns j0 .. j0 + len(X) − 1 (rows of X), per width."""
        bits = self.col_bits[j0 : j0 + X.shape[0]]
        km = self.cfg.kmeans
        wt = None
        if self._s is not None:
            X, wt = X / self._s.to(X.dtype), self._s2.expand(X.shape)
        for b in bits.unique().tolist():
            sel = torch.nonzero(bits == b)[:, 0]
            c = kmeans_1d(X[sel], 2**b, None if wt is None else wt[sel], init=km.init, max_iter=km.max_iter,
                          tol=km.tol, seed=km.seed).centroids
            lut, q, s, lo = encode_codebook(c, self.cfg.codebook_bits)
            idx = sel + j0
            self.lut[idx, : 2**b] = lut
            if q is not None:
                self.entries[idx, : 2**b], self.entry_scale[idx], self.entry_min[idx] = q, s, lo

    def _fit_column(self, w: torch.Tensor, j: int) -> None:
        """`_fit` of one column (the faithful sweep's per-column refit) without the per-width batching."""
        K = 2 ** self._bits[j]
        km = self.cfg.kmeans
        wt = None
        if self._s is not None:
            w, wt = w / self._s.to(w.dtype), self._s2[None]
        c = kmeans_1d(w[None], K, wt, init=km.init, max_iter=km.max_iter, tol=km.tol, seed=km.seed).centroids
        lut, q, s, lo = encode_codebook(c, self.cfg.codebook_bits)
        self.lut[j, :K] = lut[0]
        if q is not None:
            self.entries[j, :K], self.entry_scale[j], self.entry_min[j] = q[0], s[0], lo[0]

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        self._fit(W_group.T, j)

    def quantize_column(self, w: torch.Tensor, j: int):
        if self.group_size == 0:
            self._fit_column(w, j)
        K = 2 ** self._bits[j]
        lut = self.lut[j, :K].float()
        if self._s is None:
            codes = nearest(w[None].float(), lut[None])[0]
            wq = lut[codes].to(w.dtype)
        else:  # nearest entry of w/s = nearest of w on the row's scaled table; ŵ exactly as dequantize()
            codes = nearest((w / self._s.to(w.dtype))[None].float(), lut[None])[0]
            wq = (lut[codes] * self._s).to(w.dtype)
        n_top, n_bot = self.col_tails[j]
        if n_top or n_bot:
            order = torch.sort(w, stable=True).indices
            rows = torch.cat([order[: n_bot], order[w.numel() - n_top :]]).unique()
            vals = w[rows].half()
            wq[rows] = vals.to(w.dtype)  # kept exactly as stored: no error, nothing to propagate
            self._out_rows.append(rows)
            self._out_cols.append(j)
            self._out_vals.append(vals)
        return codes.to(torch.uint8), wq

    def finish(self, perm: torch.Tensor | None):
        n = self.col_bits.numel()
        inv = torch.arange(n) if perm is None else torch.argsort(perm)
        return make_codebook_grid("column", self.col_bits[inv], self.lut[inv], self.cfg.codebook_bits,
                                  None if self.entries is None else self.entries[inv],
                                  None if self.entry_scale is None else self.entry_scale[inv],
                                  None if self.entry_min is None else self.entry_min[inv], self.row_scale)

    def outliers(self, perm: torch.Tensor | None, shape: tuple[int, int]) -> Outliers | None:
        if not self._out_rows:
            return None
        cols = shape[1]
        orig = [j if perm is None else int(perm[j]) for j in self._out_cols]
        index = torch.cat([r * cols + c for r, c in zip(self._out_rows, orig)])
        values = torch.cat(self._out_vals)
        order = torch.argsort(index)
        return Outliers(index[order].to(torch.int32), values[order])


def row_scales(W: torch.Tensor, kind: str) -> torch.Tensor | None:
    """fp16 per-row scale s of W [out, in] ("rms" or "absmax"; all-zero rows get 1), or None for "none"."""
    if kind == "none":
        return None
    s = W.float().square().mean(1).sqrt() if kind == "rms" else W.float().abs().amax(1)
    s = s.half()
    return torch.where(s.float() > 0, s, torch.ones_like(s))  # an fp16 underflow to 0 also gets 1


def claq_quantize(W: torch.Tensor, hessian: torch.Tensor, cfg: ClaqConfig, *, feedback: bool = True,
                  dtype: torch.dtype = torch.float32, return_loss: bool = False):
    """CLAQ-quantize W [out, in] given H [in, in]. `feedback=False` drops GPTQ's error propagation
    (plain per-column k-means of the dead-fixed W, same AP/OR): the ablation baseline."""
    Wf, U, perm = sweep_operands(W, hessian, cfg.act_order, cfg.damp_percent, dtype)
    order = column_ranking(Wf, U, cfg.ap_metric, cfg.outlier_threshold)
    grid = ClaqColumnGrid(adaptive_bits(order, cfg), outlier_tails(order, cfg, W.shape[0]), cfg,
                          row_scales(Wf, cfg.row_scale))
    # Without feedback the sweep runs against a diagonal U: no off-diagonal terms, nothing propagates.
    codes, loss = gptq_sweep(Wf, U if feedback else torch.diag(torch.diagonal(U)), grid, cfg.block_size)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(W.shape, W.dtype, grid.finish(perm), codes, grid.outliers(perm, tuple(W.shape)))
    return (qw, loss) if return_loss else qw
