"""LQER / L²QER (Zhang et al., ICML 2024): low-rank reconstruction of the quantization error.

On top of any base quantizer's Ŵ, keep W ≈ Ŵ + (A·B)ᵀ with A [in, k], B [k, out], taken from the
quantization error in the paper's in × out layout, E = (W − Ŵ)ᵀ, where Ŵ is the *deployed* weight
(`QuantizedWeight.dequantize()`), so the factors correct exactly what inference computes.

The layer's output error on inputs X (rows = tokens) is ‖X(E − AB)‖²_F = N·‖R^½(E − AB)‖²_F with
R = XᵀX/N = H/2. The minimiser over rank-k products is, by Eckart–Young in the scaled space,

    S·E = U Σ Vᵀ,     A = S⁻¹ U_k,     B = Σ_k V_kᵀ,      ‖S(E − AB)‖²_F = Σ_{i>k} σ_i²      (1)

* `scale="none"`: S = I, plain LQER (SVD of E).
* `scale="act-mean"`: S = diag(s) (L²QER) with the authors' statistic s_j = max over calibration
  batches b of mean_{t∈b}|x_tj| (`LayerStats.act_mean_abs_max`). Clamped at 1e-4 so dead
  channels keep S invertible, normalised s / √(min s · max s) (a no-op for A·B that only conditions
  the factors' magnitudes before they are stored).
* `scale="act-rms"`: s_j = √R_jj (exact when input channels are uncorrelated).
* `scale="exact"`: S = R^½ (QERA): (1) is then the true minimiser of the calibration output error.

Storage (`factor_dtype`): fp16 / bf16 / fp32, or quantized after the SVD as the authors do:
"mxint8" (8-bit exponent per 16 along each row: A along the rank, B along the output) or
"int8" (symmetric, one fp16 scale per row of A = per input channel, per row of B = per rank
component; those are the sides where S⁻¹ and Σ_k put their very unequal magnitudes, so U_k and V_k
left inside each row are bounded). With `refit` (our addition; the authors quantize A and B
independently), A is quantized first and B is refitted to the deployed A in the same scaled norm,
B = argmin ‖S(E − Â B)‖_F = (S Â)⁺ S E, then quantized: no worse than the SVD's B before rounding.

Rank (`rank`, or per layer from `rank_energy` / `target_bits`): see `choose_rank`.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import SCALE_DTYPE, mxint_quantize
from lowbit.formats.quantized_weight import LowRank, QuantizedWeight, lowrank_factor_dequantize
from lowbit.methods.config import LQERConfig, ScaleKind
from lowbit.methods.stats import LayerStats

FACTOR_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FACTOR_BLOCK, FACTOR_EXP_BITS = 16, 8  # MXINT8 factors: the authors' block size and exponent width


def _normalise(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp(min=1e-4)
    return s / torch.sqrt(s.min() * s.max())


def diagonal_scale(kind: ScaleKind, stats: LayerStats | None, in_features: int) -> torch.Tensor | None:
    """s [in] for the diagonal scalings, None for S = I."""
    if kind == "none":
        return None
    if stats is None:
        raise LowbitError(f"LQER scale '{kind}' needs calibration statistics")
    if kind == "act-mean":
        if stats.act_mean_abs_max is None:
            raise LowbitError("LQER scale 'act-mean' needs the max-over-batches mean|x| statistic")
        s = stats.act_mean_abs_max.double()
    elif kind == "act-rms":
        if stats.hessian is None:
            raise LowbitError("LQER scale 'act-rms' needs the input second moment (Hessian)")
        s = torch.sqrt(torch.diagonal(stats.hessian).double().clamp(min=0) / 2)
    else:
        raise LowbitError(f"'{kind}' is not a diagonal scale")
    if s.shape != (in_features,):
        raise LowbitError(f"activation scale has shape {tuple(s.shape)}, expected ({in_features},)")
    return _normalise(s)


def sqrt_autocorrelation(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R^½, R^-½) of R = H/2 by eigendecomposition, eigenvalues floored at damp·mean(λ)."""
    R = H.double() / 2
    lam, Q = torch.linalg.eigh((R + R.T) / 2)
    lam = lam.clamp(min=max(damp * float(lam.mean()), torch.finfo(torch.float64).tiny))
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def _svd_top(M: torch.Tensor, k: int, cfg: LQERConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = M.shape
    use_rand = cfg.svd == "randomized" or (cfg.svd == "auto" and 4 * (k + cfg.oversample) < min(m, n))
    if not use_rand:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    # torch.svd_lowrank draws from the global generator: fork it so results depend on cfg.seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        U, S, V = torch.svd_lowrank(M, q=min(k + cfg.oversample, min(m, n)), niter=cfg.power_iters)
    return U[:, :k], S[:k], V[:, :k]


def _scale_ops(stats: LayerStats | None, cfg: LQERConfig, in_f: int):
    """(T, T⁻¹) as functions on [in, ·] matrices: T = I, diag(s) or R^½ by `cfg.scale`."""
    if cfg.scale == "exact":
        if stats is None or stats.hessian is None:
            raise LowbitError("LQER scale 'exact' needs the input autocorrelation (Hessian)")
        R_half, R_half_inv = sqrt_autocorrelation(stats.hessian, cfg.exact_damp)
        return (lambda X: R_half @ X), (lambda X: R_half_inv @ X)
    s = diagonal_scale(cfg.scale, stats, in_f)
    if s is None:
        return (lambda X: X), (lambda X: X)
    return (lambda X: s[:, None] * X), (lambda X: X / s[:, None])


def factor_bits(factor_dtype: str, in_f: int, out_f: int, k: int) -> int:
    """Stored bits of rank-k factors A [in, k], B [k, out] (what `LowRank.storage()` counts)."""
    codes = k * (in_f + out_f)
    if factor_dtype in FACTOR_DTYPES:
        return codes * torch.finfo(FACTOR_DTYPES[factor_dtype]).bits
    if factor_dtype == "int8":
        return 8 * codes + 16 * (in_f + k)
    nb = lambda n: -(-n // FACTOR_BLOCK)  # noqa: E731
    return 8 * codes + FACTOR_EXP_BITS * (in_f * nb(k) + k * nb(out_f))


def choose_rank(cfg: LQERConfig, sigma: torch.Tensor | None, base_bits: int, shape: tuple[int, int]) -> int:
    """The rank for one layer (out, in = shape).

    * fixed: min(rank, in, out);
    * `rank_energy` τ: the least k with Σ_{i≤k} σ_i² ≥ τ·Σ_i σ_i² (σ: every singular value of S·E);
    * `target_bits` b: the largest k ≤ min(in, out) with (base_bits + factor_bits(k)) / (in·out) ≤ b, 0 if none.
    """
    out_f, in_f = shape
    kmax = min(in_f, out_f)
    if cfg.rank_energy is not None:
        e = sigma.double().square()
        if float(e.sum()) == 0:
            return 0
        share = torch.cumsum(e, 0) / e.sum()
        return min(int(torch.searchsorted(share, torch.tensor([cfg.rank_energy], dtype=share.dtype, device=share.device))) + 1, kmax)
    if cfg.target_bits is not None:
        budget = cfg.target_bits * in_f * out_f
        fits = [k for k in range(kmax + 1) if base_bits + factor_bits(cfg.factor_dtype, in_f, out_f, k) <= budget]
        return max(fits, default=0)
    return min(cfg.rank, kmax)


def error_factors(E: torch.Tensor, stats: LayerStats | None, cfg: LQERConfig,
                  rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [in, k], B [k, out] (float64) minimising ‖S(E − AB)‖_F for E [in, out], by (1).
    `rank` overrides `cfg.rank` (k = min(rank, in, out))."""
    in_f, out_f = E.shape
    k = min(cfg.rank if rank is None else rank, in_f, out_f)
    T, T_inv = _scale_ops(stats, cfg, in_f)
    U, S, V = _svd_top(T(E.double()), k, cfg)
    return T_inv(U), S[:, None] * V.T


def quantize_factor(F: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One factor [rows, n] → (int8 codes, per-row scales) of `LowRank` kind "int8" or "mxint8"."""
    if kind == "int8":
        # symmetric: s = max|row| / 127, rounded to the stored fp16 first so codes fit the deployed scale
        s = (F.abs().amax(dim=1) / 127).to(SCALE_DTYPE).clamp(min=2.0**-24)
        q = torch.round(F / s.double()[:, None]).clamp(-127, 127)
        return q.to(torch.int8), s
    n = F.shape[1]
    q, e = mxint_quantize(torch.nn.functional.pad(F, (0, -n % FACTOR_BLOCK)), 8, FACTOR_BLOCK, FACTOR_EXP_BITS)
    return q[:, :n].contiguous(), e


def _store(A: torch.Tensor, B: torch.Tensor, E: torch.Tensor, T, cfg: LQERConfig) -> LowRank:
    kind = cfg.factor_dtype
    if kind in FACTOR_DTYPES:
        dt = FACTOR_DTYPES[kind]
        return LowRank(A.to(dt), B.to(dt))
    qA, sA = quantize_factor(A, kind)
    if cfg.refit:
        A_dep = lowrank_factor_dequantize(kind, qA, sA, FACTOR_BLOCK).double()
        B = torch.linalg.lstsq(T(A_dep), T(E)).solution
    qB, sB = quantize_factor(B, kind)
    return LowRank(qA, qB, kind, sA, sB, FACTOR_BLOCK, FACTOR_EXP_BITS)


def lqer(qw: QuantizedWeight, W: torch.Tensor, stats: LayerStats | None, cfg: LQERConfig) -> QuantizedWeight:
    """Add low-rank factors of the quantization error to `qw` (whose existing low-rank term, if any, is
    replaced). Factors are stored as `cfg.factor_dtype` and counted by `bits_per_weight()`; a chosen
    rank of 0 (bit budget already spent by the base grid) returns the base alone."""
    if tuple(W.shape) != qw.shape:
        raise LowbitError(f"weight shape {tuple(W.shape)} does not match the quantized weight {qw.shape}")
    base = QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, qw.outliers, None, qw.in_scale)
    E = (W.double() - base.dequantize().double()).T
    in_f, out_f = E.shape
    T, T_inv = _scale_ops(stats, cfg, in_f)
    M = T(E)
    if cfg.rank_energy is not None:  # needs every singular value: one full SVD, reused for the factors
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = choose_rank(cfg, S, 0, qw.shape)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    else:
        k = choose_rank(cfg, None, sum(base.storage().values()), qw.shape)
        if k == 0:
            return base
        U, S, V = _svd_top(M, k, cfg)
    if k == 0:
        return base
    lr = _store(T_inv(U), S[:, None] * V.T, E, T, cfg)
    return QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, qw.outliers, lr, qw.in_scale)
