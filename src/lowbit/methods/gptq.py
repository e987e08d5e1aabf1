"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323), as the reference code IST-DASLab/gptq does it.

For a layer with weight W [out, in] and Hessian H = (2/N) Σ xxᵀ of its inputs, quantize the columns one
at a time and push each column's rounding error onto the columns not yet quantized (OBS update):

    err_j = (w_j − q(w_j)) / [U]_jj,      W[:, j+1:] −= err_j · U[j, j+1:]

where U is the upper Cholesky factor of H⁻¹ (Alg. 1 of the paper: row j of U equals the OBS update
of H⁻¹ after eliminating columns < j). Details that matter for faithfulness:
* dead inputs (H_jj = 0): H_jj ← 1 and W[:, j] ← 0;
* act-order: sweep columns by descending diag(H);
* dampening H += λI with λ = damp_percent · mean(diag H);
* lazy batch updates: errors of a block of B columns are applied to the rest of W in one GEMM;
* dynamic groups take their min/max from W *as updated by all previous blocks* when the sweep reaches the
  group start — the reference reads the block-level W there, not the in-block copy, and so do we;
* one deliberate difference: per-channel / static parameters are fitted after dead columns are zeroed
  (the reference fits them before), which gives a tighter grid; tests/test_gptq.py pins the difference.

Optional outlier reservation (`config.outliers`, `methods.outliers`, SpQR-like): the reserved entries
are left out of the grid fit and kept in fp16 at their error-fed value, so only quantized entries feed
errors forward. With outliers = 0 the code path is exactly the plain one.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.column_grids import ColumnGrid, UniformColumnGrid
from lowbit.methods.config import GPTQConfig
from lowbit.methods.outliers import ReservedColumnGrid, fit_view, reserve_mask
from lowbit.methods.validate import check_hessian, check_weight


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, act_order: bool, damp_percent: float):
    """Dead-column fix, act-order permutation and dampening. Returns (W, H, perm or None) in sweep order.
    W and H are not modified; H's one copy is the permuted one (no extra d×d clone before it)."""
    dead = torch.diag(H) == 0
    perm = None
    if act_order:
        d = torch.diag(H).clone()
        d[dead] = 1  # the dead fix's diagonal, which the order is taken from
        perm = torch.argsort(d, descending=True, stable=True)
        W, H, dead = W[:, perm], H.index_select(0, perm).index_select(1, perm), dead[perm]
    else:
        W, H = W.clone(), H.clone()
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = damp_percent * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return W, H, perm


def inverse_cholesky_upper(H: torch.Tensor | list) -> torch.Tensor:
    """U with H⁻¹ = UᵀU (upper Cholesky factor of the inverse), as in the reference code.

    Pass `[H]` (a one-element list the caller does not keep) to let H go as soon as its factor exists:
    then at most two d×d matrices are alive at once (for a 8640-wide down_proj each is 300 MB)."""
    box = H if isinstance(H, list) else [H]
    try:
        L = torch.linalg.cholesky(box.pop())
        Hinv = torch.cholesky_inverse(L)
        del L
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise LowbitError(
            "GPTQ: the damped Hessian is not positive definite; raise damp_percent or use more calibration data"
        ) from e


def sweep_operands(W: torch.Tensor, hessian: torch.Tensor, act_order: bool, damp_percent: float,
                   dtype: torch.dtype = torch.float32):
    """Checked inputs → (W, U, perm) in sweep order for `gptq_sweep` (U: upper Cholesky factor of the damped
    H⁻¹); the damped copy of H lives only until its factor exists."""
    check_weight(W)
    check_hessian(hessian, W.shape[1])
    Wf, H, perm = prepare_hessian(W.to(dtype), hessian.to(dtype), act_order, damp_percent)
    box = [H]
    del H
    return Wf, inverse_cholesky_upper(box), perm


def gptq_sweep(W: torch.Tensor, U: torch.Tensor, grid: ColumnGrid, block_size: int = 128):
    """The column sweep with lazy block updates. W [out, in] and U in sweep order; W is overwritten.

    Returns (codes uint8 [out, in] in sweep order, loss = Σ (w − q)² / U_jj² / 2).

    Each block is processed transposed ([B, out]) so that a column is a contiguous row and the OBS
    update is one in-place rank-1 `addr_` (no out×B temporary): ~4× faster than column slicing.
    """
    rows, cols = W.shape
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
    loss = 0.0
    gs = grid.group_size
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].T.contiguous()  # [B, out]: row i is sweep column i1 + i
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d_all = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            j = i1 + i
            if gs > 0 and j % gs == 0:
                # Reference behaviour: the group's min/max from the block-level W (see module docstring).
                grid.start_group(W[:, j : j + gs], j)
            w = W1[i]
            q, wq = grid.quantize_column(w, j)
            codes_t[j] = q
            err = Err1[i]
            torch.sub(w, wq, out=err).div_(d_all[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        loss += float(Err1.square().sum()) / 2  # Σ over the block's columns of Σ err²/2
        W[:, i1:i2] = W1.T
        if i2 < cols:
            W[:, i2:].addmm_(Err1.T, U[i1:i2, i2:], alpha=-1)
    return codes_t.T.contiguous(), loss


def gptq_quantize(W: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig,
                  dtype: torch.dtype = torch.float32, return_loss: bool = False):
    """GPTQ-quantize W [out, in] given H [in, in]. `dtype` is the arithmetic (float64 for references)."""
    Wf, U, perm = sweep_operands(W, hessian, config.act_order, config.damp_percent, dtype)
    inv = None if perm is None else torch.argsort(perm)
    # Static params come from W in original column order (the dead-fixed W, before the sweep mutates it).
    W0 = Wf if inv is None else Wf[:, inv]
    mask = None  # outlier reservation (methods.outliers), in sweep order
    if config.outliers:
        args = (config.outliers, config.group_size, config.outlier_rule)
        if config.static_groups or config.group_size <= 0:  # chosen per original group, left out of the fit
            m0 = reserve_mask(W0, *args)
            W0 = fit_view(W0, m0)
            mask = m0 if perm is None else m0[:, perm]
        else:  # dynamic groups are formed in sweep order; ReservedColumnGrid masks them when fitted
            mask = reserve_mask(Wf, *args)
    grid = UniformColumnGrid(W0, config.bits, config.symmetric, config.group_size, config.static_groups, perm)
    if mask is not None:
        grid = ReservedColumnGrid(grid, mask)
    codes, loss = gptq_sweep(Wf, U, grid, config.block_size)
    if inv is not None:
        codes = codes[:, inv]
    qw = QuantizedWeight(W.shape, W.dtype, grid.finish(perm), codes,
                         None if mask is None else grid.outliers(perm, tuple(W.shape)))
    return (qw, loss) if return_loss else qw
