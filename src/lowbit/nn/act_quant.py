"""Activation fake quantization, per token: LQER's MXINT W4A8 / W4A6 and the per-token integer grid of
LRQ's W4A8.

MXINT: blocks of `block_size` consecutive features share one power-of-two exponent (the exact rounding
rules of `formats.quant_primitives.mxint_quantize`): x̂ = Q_X(x). A feature dimension that the block does
not divide (e.g. a rank-8 intermediate with blocks of 16) gets a short last block: it is zero-padded, and
zeros change neither a block's max|x| nor any other element.
INT: one asymmetric min-max grid of 2^b levels per token (its range widened to hold 0).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lowbit.formats.quant_primitives import fake_quantize_mxint


def fake_quantize_act(x: torch.Tensor, cfg) -> torch.Tensor:
    """Q_X(x) along the last dim (per token), in x's dtype. `cfg`: an ActQuantConfig. When x requires a
    gradient the rounding is straight-through (∂Q_X/∂x = 1: what LRQ's W4A8 reconstruction trains with)."""
    y = _int_per_token(x, cfg.bits) if cfg.format == "int" else _mxint(x, cfg)
    return x + (y - x).detach() if x.requires_grad else y


def _int_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = (clamp(⌊x/s⌉ + z, 0, 2^b − 1) − z)·s per token, s = (max − min)/(2^b − 1), z = ⌊−min/s⌉ (float32)."""
    xf = x.detach().float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0)  # the grid holds 0 exactly (padding and ReLU zeros stay 0)
    qmax = 2 ** bits - 1
    s = ((hi - lo) / qmax).clamp_min(1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(xf / s) + z, 0, qmax) - z) * s).to(x.dtype)


def _mxint(x: torch.Tensor, cfg) -> torch.Tensor:
    n = x.shape[-1]
    pad = -n % cfg.block_size
    xp = F.pad(x.detach(), (0, pad)) if pad else x.detach()
    y = fake_quantize_mxint(xp, cfg.bits, cfg.block_size, cfg.exp_bits)
    return y[..., :n] if pad else y
