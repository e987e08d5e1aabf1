"""QuantEase (Behdin et al., arXiv 2309.01885): cyclic coordinate descent on the layer objective.

For W [out, in] and Σ ∝ XᵀX [in, in] (the pipeline's Hessian H = (2/N)·XᵀX; the scale is irrelevant),

    f(Ŵ) = tr((W − Ŵ) Σ (W − Ŵ)ᵀ),   every column of Ŵ on its (per row, per group) uniform grid.

Fixing every column but j, f is a separable quadratic in column j with curvature Σ_jj, so the exact
minimiser over the grid is the rounding of the unconstrained one (paper, Lemma 1):

    ũ_j = (WΣ)_{:,j}/Σ_jj − Σ_{k≠j} Ŵ_{:,k} Σ_kj/Σ_jj,        Ŵ_{:,j} ← q(ũ_j).

A sweep visits every column once; `iters` sweeps (the authors' 30). Each coordinate step minimises f
exactly, so with every sweep quantized f never increases. The authors' code leaves the columns of every
third sweep unquantized while the sweep index is ≤ 25 (a relaxation; the last sweep always quantizes):
`relax: true`, the default, does the same. No inverse and no factorization of Σ.

Implementation. N = Σ·diag(Σ)⁻¹ (column j divided by Σ_jj), P = W·N once; per sweep, per block of B
columns (as GPTQ's lazy batches), U = P[:, blk] − Ŵ·N₀[:, blk] with N₀ = N without its diagonal and Ŵ as it
is at the block start (earlier blocks already swept); inside the block, column j subtracts the change of
the block's earlier columns, (Ŵ_new − Ŵ_start)[:, i1:j]·N₀[i1:j, j]. In exact arithmetic this is the
authors' per-column update; it spends the sweep's O(out·in²) in GEMMs.

Grid: the min-max grid of the original W, per channel, per tensor or in static groups (GPTQ's
`static_groups`, lowbit's default): the authors fit their groups from the original W too. Act-order
sweeps columns by descending diag(Σ). Dead inputs (Σ_jj = 0) get weight 0 and Σ_jj = 1, as in GPTQ.
`init: gptq` starts from GPTQ's solution on the same grid (the authors' `gptq_quantease`).

Outlier-aware variant (the authors' `quantease_outlier.py`, unstructured): Ŵ = Q + S with at most
k = round(f·out·in) non-zeros in S, alternating a CD sweep on Q for the target W − S with an iterative
hard-thresholding step on S: S ← top_k(S − α/(2 λ_max(Σ)) · (Q + S − W)Σ). S starts at the k largest |W|;
the grid is fitted on W without them (lowbit's outlier-reservation convention). Stored as lowbit
`Outliers` with value Q + S at S's positions (values and positions counted in the bits). The authors'
released outlier code writes each column's update into P̂ instead of Ŵ (so Q never moves); we update Ŵ.
"""

from __future__ import annotations

import math

import torch

from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.column_grids import UniformColumnGrid
from lowbit.methods.config import GPTQConfig, QuantEaseConfig
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.outliers import fit_view, take_outliers
from lowbit.methods.stats import output_error
from lowbit.methods.validate import check_hessian, check_weight


def _sweep(Qt: torch.Tensor, P: torch.Tensor, N0: torch.Tensor, grid, quantize: bool, block: int,
           codes_t: torch.Tensor) -> None:
    """One coordinate-descent sweep over every column, in place. Qt [in, out] holds Ŵᵀ (column j of Ŵ is
    the contiguous row Qt[j]); P = target·N [out, in]; N0 [in, in]. Codes of a quantized sweep go to
    codes_t [in, out]."""
    cols = Qt.shape[0]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        U = (P[:, i1:i2] - Qt.T @ N0[:, i1:i2]).T.contiguous()  # [B, out]: ũ with Ŵ at the block start
        start = Qt[i1:i2].clone()
        for i in range(i2 - i1):
            j = i1 + i
            u = U[i]
            if i:  # the block's earlier columns have moved since U was formed
                u = u - N0[i1:j, j] @ (Qt[i1:j] - start[:i])
            if quantize:
                q, u = grid.quantize_column(u, j)
                codes_t[j] = q
            Qt[j] = u


def quantease_quantize(W: torch.Tensor, hessian: torch.Tensor, config: QuantEaseConfig,
                       dtype: torch.dtype = torch.float32, return_loss: bool = False, trace: list | None = None):
    """QuantEase-quantize W [out, in] given H [in, in]. `trace`, when a list, receives f(Ŵ) after every
    sweep (float64, quantized or relaxed iterate). The loss returned is f of the result."""
    check_weight(W)
    check_hessian(hessian, W.shape[1])
    rows, cols = W.shape
    Wf, H = W.to(dtype).clone(), hessian.to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wf[:, dead] = 0
    if config.damp_percent:
        H.diagonal().add_(config.damp_percent * torch.mean(torch.diag(H)))
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if config.act_order else None
    inv = None if perm is None else torch.argsort(perm)

    mask = None  # outliers: the k largest |W| start in S and stay out of the grid fit
    k = 0
    if config.outliers:
        k = int(math.floor(config.outliers * W.numel() + 0.5))
        mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
        mask[torch.sort(-Wf.abs().flatten(), stable=True).indices[:k]] = True
        mask = mask.reshape(W.shape)
    fit = Wf if mask is None else fit_view(Wf, mask)
    grid = UniformColumnGrid(fit, config.bits, config.symmetric, config.group_size, True, perm)

    Wp, Hp = (Wf, H) if perm is None else (Wf[:, perm], H[perm][:, perm])
    N = Hp / torch.diag(Hp)  # N[k, j] = Σ_kj / Σ_jj
    N0 = N.clone()
    N0.fill_diagonal_(0)
    S = torch.zeros_like(Wp)
    if mask is not None:
        mp = mask if perm is None else mask[:, perm]
        S[mp] = Wp[mp]
        step = config.outlier_step / (2 * float(torch.linalg.eigvalsh(Hp.double())[-1]))

    if config.init == "gptq":
        gcfg = GPTQConfig(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                          act_order=config.act_order, static_groups=True, damp_percent=max(config.damp_percent, 0.01))
        start = gptq_quantize(W, hessian, gcfg, dtype=dtype).dequantize().to(dtype)
        Qt = (start if perm is None else start[:, perm]).T.contiguous()
    else:
        Qt = (Wp - S).T.contiguous()
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=Wp.device)

    def objective() -> float:
        D = (Wp - Qt.T - S).double()
        return float(output_error(D, Hp.double()))

    for it in range(config.iters):
        last = it == config.iters - 1
        quantize = not config.relax or it % 3 != 1 or last or it > 25
        P = (Wp - S) @ N
        _sweep(Qt, P, N0, grid, quantize, config.block_size, codes_t)
        if mask is not None:  # IHT on S: a gradient step on f, then the k largest entries
            R = (Qt.T + S - Wp) @ Hp
            S = S - step * R
            keep = torch.zeros(S.numel(), dtype=torch.bool, device=S.device)
            keep[torch.sort(-S.abs().flatten(), stable=True).indices[:k]] = True
            S = torch.where(keep.reshape(S.shape), S, torch.zeros_like(S))
        if trace is not None:
            trace.append(objective())
    codes = codes_t.T.contiguous()
    if inv is not None:
        codes = codes[:, inv]
    outliers = None
    if mask is not None:
        dense = Qt.T + S
        support = S != 0
        if inv is not None:
            dense, support = dense[:, inv], support[:, inv]
        outliers = take_outliers(dense, support)
    qw = QuantizedWeight(W.shape, W.dtype, grid.finish(perm), codes, outliers)
    if return_loss:
        return qw, float(output_error((W.to(dtype) - qw.dequantize(dtype)).double(), hessian.double()))
    return qw

