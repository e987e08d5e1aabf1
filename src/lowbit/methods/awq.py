"""AWQ, activation-aware weight quantization (Lin et al., MLSys 2024, arXiv 2306.00978), per layer.

Scaling input channel j of W by s_j > 0 and the input by 1/s_j leaves the layer unchanged,
y = x·Wᵀ = (x·diag(s)⁻¹)·(W·diag(s))ᵀ, but moves rounding error away from the channels with large
activations. AWQ picks s = s_X^α from one scalar α by grid search (authors' `auto_scale.py`):

    s_X = mean|x| per input channel,   s = max(s_X^α, 1e-4) / √(max s · min s),   α ∈ {0, 1/n, …, (n−1)/n}
    Ŵ(α) = Q(W·diag s)·diag(s)⁻¹,       α* = argmin_α ‖X Wᵀ − X Ŵ(α)ᵀ‖²_F ∝ tr((W − Ŵ) H (W − Ŵ)ᵀ)

with H = (2/N)·XᵀX the layer's Hessian (`LayerStats.hessian`): the output error of every candidate is
exact over all N calibration tokens without keeping X. Then, for the RTN base, the authors' clip
search (`auto_clip.py`) on the scaled weight W' = W·diag(s): per (row r, group g) shrink max|w'| by
ratios 1 − i/clip_grid, i < max_shrink·clip_grid (1.0, 0.95, …, 0.55), clamp W'_rg to [−m, m], quantize,
and keep the ratio minimising that group's own output error Δ_rg H'_gg Δ_rgᵀ, where Δ = W' − Q(clamp W')
and H' = diag(1/s)·H·diag(1/s) is the Hessian of the scaled inputs x/s (H'_gg: its diagonal block, the
group-wise error the authors measure on 512 sampled tokens; we use all of them).

Base "gptq": GPTQ on W' with H' (the layer seen from inputs x/s), after the same α search with RTN (the
authors' objective; AWQ-then-GPTQ as llm-compressor chains them). No clip search: GPTQ fits its own
grid to W' and compensates rounding error itself.

Storage: the authors fold 1/s into the previous op (a norm or a linear) when every layer reading that
input shares s. lowbit keeps each layer self-contained: the QuantizedWeight carries `in_scale` = s
(fp16 [in], 16·in bits, counted), Ŵ = (grid + outliers)·diag(s)⁻¹ (+ low-rank term), so each layer
gets its own α. When α* = 0 (s ≡ 1) nothing is stored and the result is exactly RTN's / GPTQ's.

Differences from the authors' code, all deliberate:
* per layer, not per group of linears sharing an input inspected through the whole attention / MLP
  block (lowbit's interface is per layer; unshared s is possible because nothing is folded);
* statistics come from the true-sequential pipeline (inputs of partly quantized blocks), the authors'
  from the scaled-but-unquantized model;
* the grid is lowbit's RTN min-max grid (range includes 0, GPTQ's convention), the authors' does not
  force 0 into the range;
* the authors skip clipping for q/k projections (their error is not the attention output's); a layer
  does not know its name here: set `clip: false` for them with a recipe override
  (`{pattern: 'self_attn\\.(q|k)_proj', config: {clip: false}}`) to do the same.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import SCALE_DTYPE, expand_group_param, fake_quantize_affine, group_pieces, per_group
from lowbit.methods.config import AWQConfig, GPTQConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.stats import LayerStats
from lowbit.methods.validate import check_hessian, check_weight

# Candidates evaluated together: bounds the [k, out, in] temporaries (≈ 4·CHUNK_ELEMS bytes each).
CHUNK_ELEMS = 1 << 24


def scale_candidates(act_mean_abs: torch.Tensor, n_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas [n], s [n, in] float32, rounded to the stored fp16) for α = k/n_grid, k < n_grid."""
    alphas = torch.arange(n_grid, dtype=torch.float64, device=act_mean_abs.device) / n_grid
    s = act_mean_abs.double()[None, :].pow(alphas[:, None]).clamp(min=1e-4)  # 0^0 = 1: α = 0 gives s ≡ 1
    s = s / torch.sqrt(s.amax(1, keepdim=True) * s.amin(1, keepdim=True))
    # fp16 range guard (only reachable with max/min of s_X^α beyond ~4e9); then the stored value is the
    # one searched, so the chosen error is the deployed one.
    s = s.clamp(2.0**-14, 2.0**15).to(SCALE_DTYPE)
    return alphas, s.float()


def _fake_quant(Wp: torch.Tensor, cfg) -> torch.Tensor:
    """RTN round trip of each candidate W' [k, out, in] on its own grid (groups are row-local, so a
    [k·out, in] view is k independent RTNs, except per tensor)."""
    k, out, inp = Wp.shape
    if cfg.group_size == 0:
        return torch.stack([fake_quantize_affine(w, cfg.bits, cfg.symmetric, 0) for w in Wp])
    return fake_quantize_affine(Wp.reshape(k * out, inp), cfg.bits, cfg.symmetric, cfg.group_size).view(k, out, inp)


def output_errors(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, cfg, dtype=torch.float32) -> torch.Tensor:
    """tr((W − Ŵ_k) H (W − Ŵ_k)ᵀ) for each candidate scale s_k [k, in], Ŵ_k = Q(W·diag s_k)·diag(s_k)⁻¹."""
    out, inp = W.shape
    Wf, Hd = W.float(), H.to(dtype)
    step = max(1, CHUNK_ELEMS // (out * inp))
    errs = []
    for i in range(0, s.shape[0], step):
        sk = s[i : i + step, None, :]  # [k, 1, in]
        What = _fake_quant(Wf[None] * sk, cfg) / sk  # what dequantize() computes, in float32
        D = (Wf[None] - What).to(dtype).reshape(-1, inp)
        errs.append(((D @ Hd) * D).reshape(sk.shape[0], -1).sum(1))
    return torch.cat(errs)


def clip_ratios(cfg: AWQConfig) -> torch.Tensor:
    """1 − i/clip_grid for i < max_shrink·clip_grid (authors: 20 and 0.5 → 1.0, 0.95, …, 0.55)."""
    n = max(1, int(cfg.max_shrink * cfg.clip_grid + 1e-9))
    return 1 - torch.arange(n, dtype=torch.float64) / cfg.clip_grid


def clip_search(Wp: torch.Tensor, Hp: torch.Tensor, cfg: AWQConfig,
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, group) of the scaled weight W' [out, in]: the clip max|w| · ratio minimising the group's
    output error Δ_g H'_gg Δ_gᵀ. Returns (max_val [out, G] float32, chosen ratio index [out, G],
    errors [n_ratios, out, G])."""
    out, inp = Wp.shape
    gs = inp if cfg.group_size == -1 else cfg.group_size
    ratios = clip_ratios(cfg).float().to(Wp.device)
    step = max(1, CHUNK_ELEMS // (out * inp))
    errs, c0 = [], 0
    for Wg in group_pieces(Wp.float(), gs):  # [out, G, g]: the full groups, then a partial last group
        G, g = Wg.shape[1:]
        Hb = torch.stack([Hp[c0 + j * g:c0 + (j + 1) * g, c0 + j * g:c0 + (j + 1) * g] for j in range(G)]).to(dtype)
        c0 += G * g
        amax = Wg.abs().amax(-1, keepdim=True)  # [out, G, 1]
        piece = []
        for i in range(0, len(ratios), step):
            m = amax[None] * ratios[i : i + step, None, None, None]  # [k, out, G, 1]
            Wc = torch.maximum(torch.minimum(Wg[None], m), -m)
            # Each (row, group) is its own min-max grid: RTN per row of a [k·out·G, g] view.
            Q = fake_quantize_affine(Wc.reshape(-1, g), cfg.bits, cfg.symmetric, -1).view(Wc.shape)
            D = (Wg[None] - Q).to(dtype)  # against the unclipped W': clipping error counts
            DH = torch.einsum("kogi,gij->kogj", D, Hb)
            piece.append((DH * D).sum(-1))
        errs.append(torch.cat(piece))  # [n_ratios, out, G]
    errs = torch.cat(errs, dim=2)
    amax = per_group(lambda p: p.abs().amax(-1), Wp.float(), gs)
    best = torch.argmin(errs, dim=0)  # first minimum: ties keep the larger ratio (less clipping), as the authors
    max_val = amax * ratios[best]
    return max_val, best, errs


def apply_clip(Wp: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """W' clamped to [−m, m] per (row, group)."""
    m = expand_group_param(max_val, Wp.shape, group_size)
    return torch.maximum(torch.minimum(Wp, m), -m)


def awq_search(W: torch.Tensor, stats: LayerStats | None, cfg: AWQConfig, dtype=torch.float32):
    """(α*, s* [in] float32, output error of every α [n_grid], H) — the scale search alone."""
    check_weight(W)
    if stats is None or stats.hessian is None:
        raise LowbitError("awq needs calibration statistics (a Hessian) for every layer")
    if stats.act_mean_abs is None:
        raise LowbitError("awq needs the activation scale mean|x| per input channel (LayerStats.act_mean_abs)")
    H = check_hessian(stats.hessian, W.shape[1])
    a = stats.act_mean_abs
    if tuple(a.shape) != (W.shape[1],) or not torch.isfinite(a).all() or (a < 0).any():
        raise LowbitError(f"awq: activation scale of shape {tuple(a.shape)} is not a finite non-negative "
                          f"vector of {W.shape[1]} input channels")
    alphas, s = scale_candidates(a, cfg.n_grid)
    errs = output_errors(W, H, s, cfg, dtype)
    k = int(torch.argmin(errs))  # first minimum: ties keep the smaller α (α = 0 is plain RTN)
    return float(alphas[k]), s[k], errs, H


def use_clip(cfg: AWQConfig) -> bool:
    return cfg.clip if cfg.clip is not None else (cfg.base == "rtn" and cfg.group_size != 0)


def awq_quantize(W: torch.Tensor, stats: LayerStats | None, cfg: AWQConfig, *, return_loss: bool = False,
                 dtype=torch.float32):
    """AWQ-quantize W [out, in]; `dtype` is the arithmetic of the error search (float64 for references).
    The loss is GPTQ's for the gptq base, else None."""
    _, s, _, H = awq_search(W, stats, cfg, dtype)
    grid_cfg = dict(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)
    Wp = W.float() * s
    Hp = (H.double() / (s.double()[:, None] * s.double()[None, :])).float()  # diag(1/s)·H·diag(1/s)
    loss = None
    if cfg.base == "gptq":
        gcfg = GPTQConfig(**grid_cfg, damp_percent=cfg.damp_percent, block_size=cfg.block_size,
                          act_order=cfg.act_order, static_groups=cfg.static_groups)
        qw, loss = gptq_quantize(Wp, Hp, gcfg, return_loss=True)
    else:
        if use_clip(cfg):
            Wp = apply_clip(Wp, clip_search(Wp, Hp, cfg, dtype)[0], cfg.group_size)
        qw = rtn_quantize(Wp, RTNConfig(**grid_cfg))
    qw.dtype = W.dtype
    if not bool((s == 1).all()):  # s ≡ 1 (α = 0): plain RTN / GPTQ, nothing to store
        qw.in_scale = s.to(SCALE_DTYPE)
    return (qw, loss) if return_loss else qw
