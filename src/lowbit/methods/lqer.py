"""LQER / L²QER (Zhang et al., ICML 2024): low-rank reconstruction of the quantization error.

On top of any base quantizer's Ŵ, keep W ≈ Ŵ + (A·B)ᵀ with A [in, k], B [k, out], taken from the
quantization error in the paper's in × out layout, E = (W − Ŵ)ᵀ, where Ŵ is the *deployed* weight
(`QuantizedWeight.dequantize()`), so the factors correct exactly what inference computes.

The layer's output error on inputs X (rows = tokens) is ‖X(E − AB)‖²_F = N·‖R^½(E − AB)‖²_F with
R = XᵀX/N = H/2. The minimiser over rank-k products is, by Eckart–Young in the scaled space,

    S·E = U Σ Vᵀ,     A = S⁻¹ U_k,     B = Σ_k V_kᵀ,      ‖S(E − AB)‖²_F = Σ_{i>k} σ_i²      (1)

* `scale="none"`: S = I, plain LQER (SVD of E).
* `scale="act-mean"`: S = diag(s), s_j = mean|x_j| (L²QER). The authors keep a running max over
  batches of per-batch means; the pipeline currently hands us the global mean (see notes §1.3).
  Clamped at 1e-4 so dead channels keep S invertible, normalised s / √(min s · max s) (a no-op for
  A·B that only conditions the factors' magnitudes before they are stored).
* `scale="act-rms"`: s_j = √R_jj (exact when input channels are uncorrelated).
* `scale="exact"`: S = R^½ (QERA): (1) is then the true minimiser of the calibration output error.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import LowRank, QuantizedWeight
from lowbit.methods.config import LQERConfig, ScaleKind
from lowbit.methods.stats import LayerStats

FACTOR_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
        if stats.act_mean_abs is None:
            raise LowbitError("LQER scale 'act-mean' needs mean|x| statistics")
        s = stats.act_mean_abs.double()
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


def error_factors(E: torch.Tensor, stats: LayerStats | None, cfg: LQERConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A [in, k], B [k, out] (float64) minimising ‖S(E − AB)‖_F for E [in, out], by (1)."""
    in_f, out_f = E.shape
    k = min(cfg.rank, in_f, out_f)
    E = E.double()
    if cfg.scale == "exact":
        if stats is None or stats.hessian is None:
            raise LowbitError("LQER scale 'exact' needs the input autocorrelation (Hessian)")
        R_half, R_half_inv = sqrt_autocorrelation(stats.hessian, cfg.exact_damp)
        U, S, V = _svd_top(R_half @ E, k, cfg)
        return R_half_inv @ U, S[:, None] * V.T
    s = diagonal_scale(cfg.scale, stats, in_f)
    M = E if s is None else s[:, None] * E
    U, S, V = _svd_top(M, k, cfg)
    A = U if s is None else U / s[:, None]
    return A, S[:, None] * V.T


def lqer(qw: QuantizedWeight, W: torch.Tensor, stats: LayerStats | None, cfg: LQERConfig) -> QuantizedWeight:
    """Add low-rank factors of the quantization error to `qw` (whose existing low-rank term, if any, is
    replaced). Factors are stored in `cfg.factor_dtype` and counted by `bits_per_weight()`."""
    if tuple(W.shape) != qw.shape:
        raise LowbitError(f"weight shape {tuple(W.shape)} does not match the quantized weight {qw.shape}")
    base = QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, qw.outliers, None)
    E = (W.double() - base.dequantize().double()).T
    A, B = error_factors(E, stats, cfg)
    dt = FACTOR_DTYPES[cfg.factor_dtype]
    return QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, qw.outliers, LowRank(A.to(dt), B.to(dt)))
