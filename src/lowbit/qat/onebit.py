"""OneBit (Xu et al., NeurIPS 2024): 1-bit weights as sign(W) with a rank-1 magnitude, trained by
distillation from the float model.

    y = LayerNorm( ((x ⊙ g) · sign(Ŵ_latent)ᵀ) ⊙ h ) + bias           (paper §3.2; LayerNorm without parameters)

Start (SVID, paper §3.3): W ≈ sign(W) ⊙ a·bᵀ with a·bᵀ the best rank-1 approximation of |W|; h = a, g = b.
For a nonnegative matrix the top singular pair can be taken nonnegative (Perron–Frobenius), so the best
rank-1 NMF the authors fit with sklearn is the top singular pair of |W|, found here by power iteration
in float64. The identity ‖W − sign(W)⊙abᵀ‖ = ‖|W| − abᵀ‖ makes it the best sign-times-rank-1 fit with
the signs of W (tested).

Training: the latent weight starts at `latent_init`·sign(W) (the authors' 0.01, so that signs can flip
within a few steps); the forward uses its sign, the backward the authors' surrogate
∂sign(w)/∂w ≈ 1.001 − tanh(w)². g, h and the latent weight are all trained. Exported as a `SignGrid`
(codes = latent ≥ 0, h and g in fp16, post-norm flag) — the forward at export is the trained one with
h, g rounded to fp16.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.binary import SignGrid
from lowbit.formats.quantized_weight import QuantizedWeight


def svid(W: torch.Tensor, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [out], b [in]) ≥ 0 with a·bᵀ the best rank-1 approximation of |W| (power iteration, float64)."""
    A = W.abs().double()
    b = A.sum(0)  # a positive start: the power iteration stays in the nonnegative orthant
    b = b / b.norm().clamp_min(1e-300)
    for _ in range(iters):
        a = A @ b
        b_new = A.T @ a
        b_new = b_new / b_new.norm().clamp_min(1e-300)
        if torch.allclose(b_new, b, rtol=0, atol=1e-12):
            b = b_new
            break
        b = b_new
    a = A @ b  # with ‖b‖ = 1, a·bᵀ is the projection of |W| on the singular pair
    scale = a.norm().clamp_min(1e-300).sqrt()  # balance the two factors (their product is what counts)
    return (a / scale).float(), (b * scale).float()


def sign_pm(w: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1 (every weight is one of two values)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return sign_pm(w)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (1.001 - torch.tanh(w) ** 2)


class OneBitLinear(nn.Module):
    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, *, post_norm: bool = True,
                 latent_init: float = 0.01):
        super().__init__()
        self.out_features, self.in_features = W.shape
        a, b = svid(W)
        self.weight = nn.Parameter(latent_init * sign_pm(W.float()))
        self.h = nn.Parameter(a)
        self.g = nn.Parameter(b)
        self.post_norm = post_norm
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x * self.g.to(x.dtype), _SignSTE.apply(self.weight).to(x.dtype)) * self.h.to(x.dtype)
        if self.post_norm:
            y = nn.functional.layer_norm(y, (self.out_features,))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def export(self, dtype: torch.dtype) -> QuantizedWeight:
        codes = (self.weight >= 0).to(torch.uint8)
        grid = SignGrid(self.h.detach().to(torch.float16), self.g.detach().to(torch.float16), self.post_norm)
        return QuantizedWeight((self.out_features, self.in_features), dtype, grid, codes)
