"""LR-QAT (Bondarenko et al., 2024): the low-rank term lives *inside the rounding*, in integer-grid units.

    Ŵ = s · (clamp(⌊Φ₀ + (α/r)·A·B⌉ + z₀, 0, 2^n − 1) − z₀),   Φ₀ = φ(W₀ / s₀)      (the paper's weight)

A [out, r], B [r, in] count in grid steps (1 = one quantization step of the *initial* scale s₀); s₀ and the
integer zero z₀ come from range estimation (lowbit's min-max RTN grid, or a PTQ result) and Φ₀ is frozen;
the step s starts at s₀ and is learned. The paper's grid is symmetric (z₀ = 2^(n−1)); lowbit also allows
the asymmetric min-max grid (the paper's W2 runs, marked §), so LR-QAT stores exactly what RTN stores.

φ, the storage of the frozen Φ₀: `fp32` / `bf16` / `fp16` floats, `fixed8` (the paper's Q4.4 for n = 4:
int8 holding round(clamp(Φ₀, range)·2^(8−n)), symmetric grids only) or `int` (Φ₀ = ⌊W₀/s₀⌉ in int8).

Gradients (straight-through round; zero outside the clamp, applied after rounding as in the code),
G = ∂L/∂Ŵ, M = 1[0 ≤ ⌊Z⌉ + z₀ ≤ 2^n − 1]:

    ∂L/∂A = (α/r)·(s·M⊙G)·Bᵀ,   ∂L/∂B = (α/r)·Aᵀ·(s·M⊙G),   ∂L/∂s = Σ_group G ⊙ (q − z₀)

— no LSQ term and no gradient scaling, since Φ₀ does not depend on s. As in L4Q, the full-size Z, q, Ŵ
and G are recomputed and freed inside `backward` (the paper uses activation checkpointing for this).
At step 0 (A = 0) with fp32 φ, Ŵ is exactly the RTN weight on (s₀, z₀).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.qat import grid

PHI = ("fp32", "bf16", "fp16", "fixed8", "int")
_FLOAT_PHI = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode_phi(phi0: torch.Tensor, phi: str, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Store Φ₀ = W₀/s₀ with the downcasting operator φ; lo/hi bound the grid in Φ units (−z₀, maxq − z₀)."""
    if phi in _FLOAT_PHI:
        return phi0.to(_FLOAT_PHI[phi])
    if phi == "int":
        return torch.round(phi0).clamp(lo, hi).to(torch.int8 if bits <= 7 else torch.int16)
    if phi == "fixed8":
        if not 2 <= bits <= 7:
            raise LowbitError(f"LR-QAT fixed8 storage needs 2 ≤ bits ≤ 7, got {bits}")
        # Weights outside the initial range are clipped for good, as in the reference code.
        return torch.round(phi0.clamp(lo, hi) * 2 ** (8 - bits)).clamp(-128, 127).to(torch.int8)
    raise LowbitError(f"unknown LR-QAT storage {phi!r}; choose one of {PHI}")


def decode_phi(stored: torch.Tensor, phi: str, bits: int, dtype: torch.dtype) -> torch.Tensor:
    x = stored.to(dtype)
    return x / 2 ** (8 - bits) if phi == "fixed8" else x


def lrqat_codes(phi0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, z0: torch.Tensor,
                bits: int, group_size: int):
    """(q, unclamped code) of clamp(⌊Φ₀ + scale·A·B⌉ + z₀, 0, 2^n − 1), z₀ broadcast from [R, G]."""
    Z0 = grid.expand(z0.to(phi0.dtype), phi0.shape, group_size)
    u = torch.round(phi0 + scale * (A.to(phi0.dtype) @ B.to(phi0.dtype))) + Z0
    return u.clamp(0, 2**bits - 1), u, Z0


class LRQATFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi0, A, B, s, z0, scale: float, bits: int, group_size: int):
        with torch.no_grad():
            q, _, Z0 = lrqat_codes(phi0, A, B, scale, z0, bits, group_size)
            S = grid.expand(grid.snap_scale(s.detach().to(phi0.dtype)), phi0.shape, group_size)
            y = x @ grid.dequant(q, S, Z0).to(x.dtype).T
        ctx.save_for_backward(x, phi0, A, B, s, z0)
        ctx.cfg = (scale, bits, group_size)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, phi0, A, B, s, z0 = ctx.saved_tensors
        scale, bits, group_size = ctx.cfg
        q, u, Z0 = lrqat_codes(phi0, A, B, scale, z0, bits, group_size)
        S = grid.expand(grid.snap_scale(s.detach().to(phi0.dtype)), phi0.shape, group_size)
        n = q - Z0  # the integer weight W_int
        del q
        gx = gy @ (n * S).to(gy.dtype) if ctx.needs_input_grad[0] else None
        G = gy.reshape(-1, gy.shape[-1]).T.to(phi0.dtype) @ x.reshape(-1, x.shape[-1]).to(phi0.dtype)
        gs = grid.group_sum(G * n, group_size).to(s.dtype) if ctx.needs_input_grad[4] else None
        del n
        G.mul_(S).mul_((u >= 0) & (u <= 2**bits - 1))  # ∂L/∂Z = s·M⊙G
        del u, S, Z0
        gA = (scale * (G @ B.to(G.dtype).T)).to(A.dtype) if ctx.needs_input_grad[2] else None
        gB = (scale * (A.to(G.dtype).T @ G)).to(B.dtype) if ctx.needs_input_grad[3] else None
        del G
        return gx, None, gA, gB, gs, None, None, None, None


class LRQATLinear(nn.Module):
    """A linear layer trained the LR-QAT way; `export()` merges it into a plain UniformGrid weight."""

    def __init__(self, phi0: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor, bias: torch.Tensor | None, *,
                 bits: int, group_size: int, symmetric: bool, rank: int, alpha: float, phi: str = "fp32",
                 learn_scale: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = phi0.shape
        R, G = grid.check_grid((out_f, in_f), bits, group_size)
        if tuple(s0.shape) != (R, G) or tuple(z0.shape) != (R, G):
            raise ValueError(f"scale/zero shape {tuple(s0.shape)}/{tuple(z0.shape)}, {(R, G)} expected")
        if phi == "fixed8" and not symmetric:
            raise LowbitError("LR-QAT fixed8 storage (Q4.4) needs a symmetric grid, as in the paper")
        self.bits, self.group_size, self.symmetric, self.rank, self.phi = bits, group_size, symmetric, rank, phi
        self.scale = alpha / rank
        Z0 = grid.expand(z0.float(), phi0.shape, group_size)
        self.register_buffer("phi0", encode_phi(phi0.float(), phi, bits, -Z0, 2**bits - 1 - Z0))
        self.register_buffer("z0", z0.to(torch.int32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Reference code: B (r × in) Kaiming-uniform(a = √5), A (out × r) zeros, so step 0 is RTN(W₀; s₀).
        B = torch.empty(rank, in_f, dtype=torch.float32)
        nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32))
        self.B = nn.Parameter(B)
        self.s = nn.Parameter(s0.detach().float().clone(), requires_grad=learn_scale)
        self.in_features, self.out_features = in_f, out_f

    def _phi0(self) -> torch.Tensor:
        return decode_phi(self.phi0, self.phi, self.bits, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = LRQATFunction.apply(x, self._phi0(), self.A, self.B, self.s, self.z0, self.scale, self.bits,
                                self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        phi0 = self._phi0()
        q, _, Z0 = lrqat_codes(phi0, self.A, self.B, self.scale, self.z0, self.bits, self.group_size)
        return grid.dequant(q, grid.expand(grid.snap_scale(self.s.float()), phi0.shape, self.group_size), Z0)

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        from lowbit.formats.quantized_weight import UniformGrid

        phi0 = self._phi0()
        q = lrqat_codes(phi0, self.A, self.B, self.scale, self.z0, self.bits, self.group_size)[0]
        s_q = grid.snap_scale(self.s.float())
        g = UniformGrid(self.bits, self.group_size, self.symmetric, s_q.to(torch.float16), self.z0.clone())
        qw = QuantizedWeight(tuple(phi0.shape), dtype, g, q.to(torch.uint8))
        qw.check()
        return qw

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, phi={self.phi}")
