"""HQQ, half-quadratic quantization (Badri & Shaji, 2023): calibration-free, the zero point of each group
is optimised for the l_p norm (p < 1) of the weight error, the min-max scale kept.

Per group (g input columns of one output row), with s the min-max scale:

    min_z ‖W − (Q_z(W) − z)·s‖_p^p,   Q_z(W) = clamp(round(W/s + z), 0, 2^b − 1).

The l_p term (p = 0.7: heavy-tailed errors, a few large ones are cheaper than many small ones) is split
half-quadratically with an auxiliary error W_e ≈ W − W_r and solved by alternating minimisation:

    W_q = clamp(round(W/s + z)),   W_r = (W_q − z)·s
    W_e = shrink_p(W − W_r, β) = sign(Δ)·max(|Δ| − |Δ|^(p−1)/β, 0)      (generalised soft threshold)
    z   = mean_group(W_q − (W − W_e)/s)                                 (closed-form zero given W_q, W_e)
    β  ← κ·β

β is in weight units: W_e ≠ 0 only where |Δ| > β^(−1/(2−p)) (0.17 at β = 10, p = 0.7), far above the
errors of LLM-scale weights (|Δ| ≤ s/2 ~ 1e-3..1e-2). There W_e = 0 and the step is the least-squares zero
given the codes, z = mean(W_q − W/s), alternated with re-rounding and stopped on the l1 error: that, as in
the reference code with its defaults, is what HQQ does on real weights.

Differences from the reference code (mobiusml/hqq `optimize_weights_proximal`), all deliberate:
* float32 throughout (HQQ itself runs fp16 on CUDA, fp32 on CPU);
* early stopping and keep-best are per group (HQQ stops the whole tensor when the global mean|W − W_r|
  rises, and returns the zero of the iterate after the rise): each group stops when its own
  mean|W − W_r| stops decreasing, and keeps its best iterate;
* the codes are chosen for the zero as stored (fp16, or rounded to an integer with `zero="int"`), so
  `dequantize()` is exactly what `lowbit` evaluates; with integer zeros a group keeps the rounded
  min-max zero (RTN's) where rounding the optimised one is no better;
* the min-max range includes 0 (lowbit's affine convention, the same scale as RTN's): the initial zero
  lies in [0, 2^b − 1], so fp16 zeros stay precise and integer zeros pack in b bits. LLM weight groups
  straddle 0, where this is HQQ's own min-max.
"""

from __future__ import annotations

import torch

from lowbit.formats.quant_primitives import affine_qparams, group_pieces
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid
from lowbit.methods.config import HQQConfig
from lowbit.methods.validate import check_weight

ZERO_DTYPE = torch.float16  # HQQ's default meta: fp16 scale and fp16 (unrounded) zero


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold, the proximal step of (1/β)·|x|^p: sign(x)·max(|x| − |x|^(p−1)/β, 0).
    At x = 0, |x|^(p−1) = inf and the result is 0 (no NaN: max(−inf, 0) = 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def hqq_codes(Wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """W_q = clamp(round(W/s + z), 0, 2^b − 1) as float (z is added *before* rounding: it is not an integer)."""
    return torch.round(Wg / s + z).clamp_(0, maxq)


def _stored_zero(z: torch.Tensor, mode: str, maxq: int) -> torch.Tensor:
    """The zero as it will be stored, back in float32: fp16-rounded, or an integer in [0, 2^b − 1]."""
    if mode == "int":
        return torch.round(z).clamp_(0, maxq)
    return z.to(ZERO_DTYPE).float()


def _monitor(Wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """HQQ's early-stop criterion per group: mean|W − W_r|."""
    return (Wg - (hqq_codes(Wg, s, z, maxq) - z) * s).abs().mean(-1, keepdim=True)


def hqq_zero(Wg: torch.Tensor, s: torch.Tensor, z0: torch.Tensor, config: HQQConfig) -> torch.Tensor:
    """Optimise the zeros [R, G, 1] of the groups Wg [R, G, g] with scales s [R, G, 1]; returns the zero
    to store per group (float32 values of the stored dtype)."""
    maxq = 2**config.bits - 1
    z, best_z = z0, z0
    best_err = torch.full_like(z0, float("inf"))
    active = torch.ones_like(z0, dtype=torch.bool)
    beta = config.beta0
    for _ in range(config.iters):
        Wq = hqq_codes(Wg, s, z, maxq)
        D = Wg - (Wq - z) * s
        err = D.abs().mean(-1, keepdim=True)
        better = active & (err < best_err)  # a group stops at its first non-decrease and keeps its best
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
        active = better
        if not bool(active.any()):
            break
        We = shrink_lp(D, beta, config.p)
        z = torch.where(active, (Wq - (Wg - We) / s).mean(-1, keepdim=True), z)
        beta *= config.kappa
    zs = _stored_zero(best_z, config.zero, maxq)
    if config.zero == "int":
        # Rounding may undo the gain: keep the rounded min-max zero (RTN's) where it is at least as good.
        z_rtn = _stored_zero(z0, "int", maxq)
        zs = torch.where(_monitor(Wg, s, z_rtn, maxq) <= _monitor(Wg, s, zs, maxq), z_rtn, zs)
    return zs


def hqq_quantize(W: torch.Tensor, config: HQQConfig) -> QuantizedWeight:
    check_weight(W)
    bits, gs = config.bits, config.group_size
    maxq = 2**bits - 1
    scale, _ = affine_qparams(W, bits, False, gs)  # RTN's min-max scale [R, G] (fp16, validates bits/groups)
    zs, codes = [], []
    # The full groups and a partial last group (group_pieces) are each solved as groups of their own size.
    for Wg, sc in zip(group_pieces(W.float().contiguous(), gs), _split_like(scale, gs, W.shape[1])):
        s = sc.float().unsqueeze(-1)
        # Unrounded min-max zero −min/s, with affine_qparams' range (0 included; an all-zero group spans [−1, 1]).
        lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)
        lo = torch.where((lo == 0) & (hi == 0), -1.0, lo)
        z = hqq_zero(Wg, s, -lo / s, config)
        zs.append(z.squeeze(-1))
        codes.append(hqq_codes(Wg, s, z, maxq).to(torch.uint8))
    codes = codes[0].reshape(W.shape) if gs == 0 else torch.cat([c.reshape(W.shape[0], -1) for c in codes], 1)
    zero = torch.cat(zs, 1).to(torch.int32 if config.zero == "int" else ZERO_DTYPE)
    return QuantizedWeight(W.shape, W.dtype, UniformGrid(bits, gs, False, scale, zero), codes)


def _split_like(p: torch.Tensor, group_size: int, cols: int) -> list[torch.Tensor]:
    """Per-group parameters [R, G] split as `group_pieces` splits the columns (full groups | partial)."""
    if group_size <= 0 or cols % group_size == 0:
        return [p]
    return [p[:, :-1], p[:, -1:]] if cols > group_size else [p]
