"""AQLM (Egiazarian et al., "Extreme Compression of Large Language Models via Additive Quantization",
ICML 2024, arXiv 2401.06118; reference code Vahe1994/AQLM): additive multi-codebook vector quantization
of one layer against its calibration objective

    L = tr((W − Ŵ) H (W − Ŵ)ᵀ),   Ŵ_r = s_r · Σ_m C_m[b_{r,j,m}] on vector j of row r   (`formats.additive`)

1. Row scales s_r = rms(W_r) (the reference's per-output-unit scale, our normalisation), V = W / s.
2. Init: residual k-means on the g-vectors of V — k-means, subtract the nearest codeword, k-means on the
   residual, M times (the paper's App. E: the init matters for convergence).
3. `rounds` times, each step never raising L (from the point it starts at):
   a. codebooks: Ŵ is linear in the codewords for fixed codes, so L is a quadratic in C; its least-squares
      minimiser is approached by conjugate gradients on the normal equations 𝒜(C) = Aᵀ(s ⊙ W H), with
      𝒜(P) = Aᵀ(s ⊙ (s ⊙ U(P)) H), U(P) the gathered codewords and Aᵀ the scatter-add back onto codewords
      (the reference takes 100 Adam steps on the same objective; CG needs no learning rate);
   b. scales: per row the exact minimiser s_r = ⟨W_r H, U_r⟩ / ⟨U_r H, U_r⟩;
   c. codes: beam search, one vector position j at a time with all others fixed (the paper's MRF view:
      unary terms from the residual, pairwise terms from H). For row r, replacing u = U_r[j] by u' changes
      L_r/s_r² by q(u') − q(u), q(u') = u'ᵀH_jj u' − 2u'ᵀ(H_jj u + G_rj), G = (V − U)H. Keep `beam_size`
      candidates; for each codebook m in turn, try all 2^B codewords in every candidate. The current codes
      are a candidate with change 0, so the best never gets worse. G is updated after each position.
4. The codebooks and scales are rounded to fp16 (as stored) and the scales refitted against the rounded
   codebooks.

Block fine-tuning (recipe `finetune_steps` > 0): after a block's layers are quantized, Adam on their
codebooks and row scales, codes fixed, against the float block's outputs (`pipeline.reconstruct.
tune_additive_block`, driven by the calibration pipeline). Not here: the paper's end-to-end KD.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.additive import AdditiveGrid, additive_vectors
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.config import AQLMConfig
from lowbit.methods.validate import check_hessian, check_weight


def objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64."""
    D = (W - W_hat).double()
    return float(((D @ H.double()) * D).sum())


def kmeans(X: torch.Tensor, k: int, iters: int, gen: torch.Generator, sample: int = 65536):
    """Lloyd's k-means of the rows of X [n, g]: centroids fitted on a seeded sample of ≤ `sample` rows (init:
    distinct random rows), then every row assigned. Empty clusters are re-seeded at the worst-served rows."""
    n = X.shape[0]
    fit = X if n <= sample else X[torch.randperm(n, generator=gen)[:sample]]
    m = fit.shape[0]
    C = fit[torch.randperm(m, generator=gen)[: min(k, m)]].clone()
    if C.shape[0] < k:  # fewer vectors than codewords: pad with copies (codes never need them)
        C = torch.cat([C, C[:1].expand(k - C.shape[0], -1)])
    for _ in range(iters):
        a, d = _nearest(fit, C)
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros_like(C).index_add_(0, a, fit)
        empty = counts == 0
        C = torch.where(empty[:, None], C, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            far = d.topk(int(empty.sum())).indices
            C[empty] = fit[far]
    return C, _nearest(X, C)[0]


def _nearest(X: torch.Tensor, C: torch.Tensor, chunk: int = 32768):
    c2 = C.square().sum(1)
    idx, dist = torch.empty(X.shape[0], dtype=torch.long), torch.empty(X.shape[0])
    for i in range(0, X.shape[0], chunk):
        x = X[i:i + chunk]
        v, a = torch.addmm(c2[None, :], x, C.T, alpha=-2).min(1)  # ‖c‖² − 2x·c, one fused pass
        idx[i:i + chunk], dist[i:i + chunk] = a, v + x.square().sum(1)
    return idx, dist


def _scatter(X: torch.Tensor, codes: torch.Tensor, shape) -> torch.Tensor:
    """Aᵀ: add every vector of X [rows, J, g] onto the codewords its codes name → [M, K, g]."""
    M, K, g = shape
    out = torch.zeros(M, K, g, dtype=X.dtype)
    flat = X.reshape(-1, g)
    for m in range(M):
        out[m].index_add_(0, codes[..., m].reshape(-1), flat)
    return out


def _update_codebooks(WH, s, codes, C, H, iters: int):
    """`WH` = W·H (constant over the rounds)."""
    rows, cols = WH.shape
    J, g = codes.shape[1], C.shape[2]
    sc = s[:, None, None]

    def op(P):
        return _scatter(sc * ((sc * additive_vectors(P, codes)).reshape(rows, cols) @ H).reshape(rows, J, g), codes, C.shape)

    rhs = _scatter(sc * WH.reshape(rows, J, g), codes, C.shape)
    r = rhs - op(C)
    p, rr = r.clone(), float(r.square().sum())
    tol = 1e-10 * max(float(rhs.square().sum()), 1e-30)
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = op(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rr / pAp
        C = C + alpha * p
        r = r - alpha * Ap
        rr_new = float(r.square().sum())
        p, rr = r + (rr_new / rr) * p, rr_new
    return C


def _update_scales(WH, U, H, s):
    num = (WH * U).sum(1)
    den = ((U @ H) * U).sum(1)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), s)


def _beam_search(V, U, codes, C, H, beam_size: int, row_chunk: int):
    """One pass over the vector positions j (see the module docstring); updates U and codes in place."""
    rows, J, g = U.shape
    M, K, _ = C.shape
    G = (V - U.reshape(rows, -1)) @ H  # [rows, cols]; V [rows, cols], U [rows, J, g]
    for j in range(J):
        sl = slice(j * g, (j + 1) * g)
        Hjj = H[sl, sl]
        CH = C @ Hjj  # [M, K, g]
        quad = (CH * C).sum(-1)  # [M, K]: cᵀ H_jj c
        new_u = torch.empty(rows, g)
        for r0 in range(0, rows, row_chunk):
            r1 = min(rows, r0 + row_chunk)
            u = U[r0:r1, j]
            y = u @ Hjj + G[r0:r1, sl]  # H_jj u + G_j  (H symmetric)
            beams = codes[r0:r1, j][:, None, :].clone()  # [n, 1, M]
            bu = u[:, None, :].clone()  # [n, 1, g]: the candidates' vectors
            score = torch.zeros(r1 - r0, 1)  # q(candidate) − q(u)
            for m in range(M):
                n, b = beams.shape[:2]
                old = C[m][beams[..., m]]  # [n, b, g]
                a = (bu - old) @ Hjj - y[:, None, :]  # H_jj(u' − c_old) − y
                # q(u' − c_old + c_k) − q(u') = c_kᵀH_jj c_k + 2c_k·a − (c_oldᵀH_jj c_old + 2c_old·a)
                base = score - quad[m][beams[..., m]] - 2 * (a * old).sum(-1)  # [n, b]; Δ = 0 at k = old
                total = torch.addmm(quad[m][None, :], a.reshape(-1, g), C[m].T, alpha=2).view(n, b, K)
                total += base[..., None]
                top = total.view(n, b * K).topk(min(beam_size, b * K), dim=1, largest=False, sorted=False)
                parent, k = top.indices // K, top.indices % K
                beams = torch.gather(beams, 1, parent[..., None].expand(-1, -1, M)).clone()
                beams[..., m] = k
                bu = torch.gather(bu - old, 1, parent[..., None].expand(-1, -1, g)) + C[m][k]
                score = top.values
            best = score.argmin(1)
            ar = torch.arange(r1 - r0)
            codes[r0:r1, j] = beams[ar, best]
            new_u[r0:r1] = bu[ar, best]
        delta_u = new_u - U[:, j]
        U[:, j] = new_u
        G -= delta_u @ H[sl, :]
    return U, codes


def aqlm_quantize(W: torch.Tensor, hessian: torch.Tensor | None, config: AQLMConfig,
                  return_loss: bool = False):
    check_weight(W)
    rows, cols = W.shape
    M, B, g = config.num_codebooks, config.nbits_per_codebook, config.in_group_size
    if cols % g:
        raise LowbitError(f"AQLM: the input dimension {cols} is not a multiple of the vector length {g}")
    H = torch.eye(cols) if hessian is None else hessian.float()
    check_hessian(H, cols)
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(config.damp_percent * float(torch.diag(H).mean()))
    Wf = W.float()
    K, J = 2**B, cols // g
    gen = torch.Generator().manual_seed(config.seed)
    s = (Wf.square().mean(1).sqrt()).clamp_min(1e-8).half().float()
    V = Wf / s[:, None]
    # 2. residual k-means
    C = torch.empty(M, K, g)
    codes = torch.empty(rows, J, M, dtype=torch.long)
    R = V.reshape(-1, g).clone()
    for m in range(M):
        C[m], a = kmeans(R, K, config.kmeans_iters, gen)
        codes[..., m] = a.reshape(rows, J)
        R -= C[m][a]
    del R
    history = [objective(Wf, s[:, None] * additive_vectors(C, codes).reshape(rows, cols), H)]  # the init's
    row_chunk = max(1, (1 << 24) // (config.beam_size * K))  # bounds the [rows, beam, K] score tensor
    WH = Wf @ H
    for _ in range(config.rounds):
        C = _update_codebooks(WH, s, codes, C, H, config.cg_iters)
        U = additive_vectors(C, codes)
        s = _update_scales(WH, U.reshape(rows, cols), H, s)
        U, codes = _beam_search(Wf / s[:, None], U, codes, C, H, config.beam_size, row_chunk)
        history.append(objective(Wf, s[:, None] * U.reshape(rows, cols), H))
    # 4. as stored: fp16 codebooks, scales refitted to them, fp16
    C16 = C.half()
    U = additive_vectors(C16.float(), codes).reshape(rows, cols)
    s16 = _update_scales(WH, U, H, s).half()
    if not bool(torch.isfinite(s16).all()):
        raise LowbitError("AQLM: a row scale overflows fp16")
    code_dtype = torch.uint8 if B <= 8 else torch.int32
    grid = AdditiveGrid(M, B, g, C16, s16)
    qw = QuantizedWeight(W.shape, W.dtype, grid, codes.to(code_dtype))
    qw.history = history  # the objective (damped H) at the init and after each round, for tests and benches
    return (qw, objective(Wf, qw.dequantize(), H)) if return_loss else qw
