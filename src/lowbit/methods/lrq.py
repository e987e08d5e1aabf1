"""LRQ (Lee et al., NAACL 2025): learned low-rank weight-scaling matrices for block reconstruction.

One linear W [out, in] is quantized as (the authors' `quant/UniformAffineQuantizer.py`)

    Ŵ = s₁ ⊙ clamp(⌊W ⊘ D⌉, −z, 2^b − 1 − z),    D = s₁ ⊙ exp(L₂U₂ + r₂ + c₂),

s₁ [out, G] a learned scale (log domain) per output channel (G = 1) or per group, z the integer zero
point fixed at the start, L₂ [out, r] (init 0) and U₂ [r, in] (Kaiming-uniform) a low-rank exponent,
r₂ [out, 1] and c₂ [1, in] row and column vectors (init 0). FlexRound, its parent, learns a full matrix
S₂ [out, in] in place of L₂U₂ + r₂ + c₂ (`rank: 0`). ⌊·⌉ passes gradients straight through; the clamp
does not (the authors' STE). s₁ acts twice: as the outer multiplier and inside D.

At the start the exponent is exactly 0, so D = s₁ and Ŵ is round-to-nearest on the initial grid: the
block's loss at step 0 is RTN's. Whatever the parameters learn, Ŵ/s₁ are integers in [−z, 2^b−1−z]: the
result is stored as a plain asymmetric uniform grid (codes q = ⌊W ⊘ D⌉ + z, scale s₁ in fp16, zero z) and
costs nothing at inference. The outer s₁ is rounded to fp16 in the forward pass (straight-through), so
the trained Ŵ and the stored one are the same numbers.

Initial s₁, z: min-max per channel/group, or with `clipping` the shrink ratio α ∈ {1, 0.99, …, 0.01}
of [α·min, α·max] minimising Σ|W − Ŵ|^p (p = 2.4) per channel/group. The authors search a 2-D grid
(range and zero point) for channels with both signs; this is the 1-D range search, stated as such.

The block objective (mean over tokens of ‖block_q(X̃) − block_fp(X)‖², X̃ the input from the already
quantized blocks) lives in `pipeline.reconstruct`, which runs this module's `LRQLinear`s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.quant_primitives import SCALE_DTYPE, expand_group_param, per_group
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid
from lowbit.methods.config import LRQConfig
from lowbit.methods.validate import check_weight


def default_rank(shape: tuple[int, int], config: LRQConfig) -> int:
    """r of L₂U₂: the config's, capped at min(out, in); None → ⌈min(out, in)/4⌉; 0 = FlexRound's full S₂."""
    lo = min(shape)
    if config.rank is None:
        return max(1, math.ceil(lo / 4))
    return min(config.rank, lo)


def lp_grid(W: torch.Tensor, bits: int, group_size: int, clipping: bool, p: float = 2.4,
            grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (s₁ [R, G] float32, already rounded to fp16; z [R, G] int32) per channel/group: min-max,
    or the shrink ratio α of [α·min, α·max] with the least Σ|W − Ŵ|^p."""
    maxq = 2**bits - 1
    Wf = W.float()
    xmin = per_group(lambda g: g.amin(-1), Wf, group_size).clamp(max=0)
    xmax = per_group(lambda g: g.amax(-1), Wf, group_size).clamp(min=0)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)

    def fit(a: float | torch.Tensor):
        s = ((xmax - xmin) * a / maxq).to(SCALE_DTYPE).float().clamp(min=2.0**-24)
        z = torch.round(-xmin * a / s).clamp(0, maxq)
        return s, z

    best_s, best_z = fit(1.0)
    if not clipping:
        return best_s, best_z.to(torch.int32)
    best = None
    for i in range(grid):
        s, z = fit(1 - i / grid)
        se, ze = (expand_group_param(t, W.shape, group_size) for t in (s, z))
        err = ((torch.clamp(torch.round(Wf / se) + ze, 0, maxq) - ze) * se - Wf).abs().pow(p)
        err = per_group(lambda g: g.sum(-1), err, group_size)
        if best is None:
            best = err
            continue
        better = err < best  # strict: ties keep the larger range
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z.to(torch.int32)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class LRQWeight(nn.Module):
    """The learned quantizer of one weight: `forward()` is Ŵ, `materialize()` its QuantizedWeight."""

    def __init__(self, W: torch.Tensor, config: LRQConfig, generator: torch.Generator | None = None):
        super().__init__()
        check_weight(W)
        self.bits, self.group_size = config.bits, config.group_size
        self.shape, self.dtype = tuple(W.shape), W.dtype
        out, inp = W.shape
        self.register_buffer("W", W.detach().float().clone())
        s1, z = lp_grid(W, config.bits, config.group_size, config.clip(), config.lp, config.clip_grid)
        self.log_s1 = nn.Parameter(s1.log())
        self.register_buffer("zero", z.float())
        self.rank = default_rank(self.shape, config)
        if self.rank == 0:  # FlexRound
            self.S2 = nn.Parameter(torch.zeros(out, inp))
        else:
            self.L2 = nn.Parameter(torch.zeros(out, self.rank))
            U2 = torch.empty(self.rank, inp)
            nn.init.kaiming_uniform_(U2, a=math.sqrt(5), generator=generator)
            self.U2 = nn.Parameter(U2)
            self.r2 = nn.Parameter(torch.zeros(out, 1))
            self.c2 = nn.Parameter(torch.zeros(1, inp))

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        return expand_group_param(p, torch.Size(self.shape), self.group_size)

    def exponent(self) -> torch.Tensor:
        """log(D/s₁): L₂U₂ + r₂ + c₂ (or S₂)."""
        return self.S2 if self.rank == 0 else self.L2 @ self.U2 + self.r2 + self.c2

    def integers(self) -> torch.Tensor:
        """clamp(⌊W ⊘ D⌉, −z, 2^b−1−z), differentiable by the STE inside the clamp range."""
        s1 = self._expand(self.log_s1.exp())
        z = self._expand(self.zero)
        v = _RoundSTE.apply(self.W / (s1 * torch.exp(self.exponent())))
        return torch.minimum(torch.maximum(v, -z), (2**self.bits - 1) - z)

    def forward(self) -> torch.Tensor:
        s1 = self.log_s1.exp()
        s1 = s1 + (s1.to(SCALE_DTYPE).float() - s1).detach()  # the stored fp16 value, gradient of s₁
        return self._expand(s1) * self.integers()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def materialize(self) -> QuantizedWeight:
        codes = (self.integers() + self._expand(self.zero)).to(torch.uint8)
        scale = self.log_s1.exp().to(SCALE_DTYPE)
        grid = UniformGrid(self.bits, self.group_size, False, scale, self.zero.to(torch.int32))
        return QuantizedWeight(torch.Size(self.shape), self.dtype, grid, codes)


class LRQLinear(nn.Module):
    """A linear computing x·Ŵᵀ + b with Ŵ from its `LRQWeight`, for the block reconstruction."""

    def __init__(self, quantizer: LRQWeight, bias: torch.Tensor | None, act=None):
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = quantizer.shape
        self.act = act  # W4A8: the input is fake-quantized (straight-through), as the deployed layer does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            from lowbit.nn.act_quant import fake_quantize_act

            x = fake_quantize_act(x, self.act)
        return F.linear(x, self.quantizer(), self.bias)
