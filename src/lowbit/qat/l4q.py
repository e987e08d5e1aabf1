"""L4Q (Jeon et al., ACL 2025): LoRA merged *before* a learned-step quantizer, with a memory-saving backward.

Forward of one linear layer (paper Eqs. 7–10), on lowbit's grid (`qat.grid`):

    W_c = W₀ + (α/r)·B·A                       B [out, r], A [r, in], W₀ frozen
    w   = (W_c − b)/s,  w̃ = round(clamp(w, Q_N, Q_P)),  W_q = w̃·s + b,   Q_N = −2^(n−1), Q_P = 2^(n−1) − 1
    Y   = X·W_qᵀ

with one learned step s and offset b per group of input columns; s is snapped to fp16 and b to a whole
number of steps in the forward (straight-through), so W_q is exactly what the exported UniformGrid holds.

Backward (Eqs. 11–21, LSQ/LSQ+ with the straight-through estimator), G_W = ∂L/∂W_q = G_Yᵀ·X summed over
batch and sequence, M = 1[Q_N ≤ w ≤ Q_P]:

    ∂L/∂X = G_Y·W_q
    ∂L/∂A = (α/r)·Bᵀ·(M ⊙ G_W),   ∂L/∂B = (α/r)·(M ⊙ G_W)·Aᵀ
    ∂L/∂s = g·Σ_group G_W ⊙ {w̃ − w inside, Q_N below, Q_P above}
    ∂L/∂b = g·Σ_group G_W ⊙ (1 − M)

g is LSQ's gradient scale 1/√(N·Q_P) with N the weights per group (`grad_scale="lsq"`; the paper does not
say whether it uses it; under AdamW a constant per-tensor factor cancels up to ε, so it matters for SGD).

Memory (paper App. E): the autograd graph keeps only X and the small A, B, s, b; W_c, W_q and G_W are
recomputed inside `backward`, used and dropped there, and G_W never becomes a parameter gradient with
optimizer state. Peak memory is therefore that of plain LoRA plus one transient [out, in] tensor family.

`W₀` may be stored in bf16/fp16 (`base_dtype`); W_c is always formed in float32 (float64 in tests).
With `W0` trainable and no adapter, the same function is full-weight LSQ QAT (∂L/∂W₀ = M ⊙ G_W), the
memory-hungry baseline the paper compares against.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.qat import grid


def _compute_dtype(W0: torch.Tensor) -> torch.dtype:
    return torch.promote_types(W0.dtype, torch.float32)


def merged(W0: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> torch.Tensor:
    """W_c = W₀ + scale·B·A in float32 (or float64 when W₀ is)."""
    dt = _compute_dtype(W0)
    W = W0.to(dt)
    if A is None:
        return W
    return W + scale * (B.to(dt) @ A.to(dt))


def quantize_merged(Wc: torch.Tensor, s: torch.Tensor, b: torch.Tensor, bits: int, group_size: int):
    """(W_q, r = W_c/s, S, Z): the grid's weight, with what the backward needs, from raw s and b."""
    s_q = grid.snap_scale(s.detach().to(Wc.dtype))
    z = grid.offset_to_zero(b.detach().to(Wc.dtype), s_q, bits)
    S, Z = grid.expand(s_q, Wc.shape, group_size), grid.expand(z, Wc.shape, group_size)
    r = Wc / S
    q = (torch.round(r) + Z).clamp_(0, 2**bits - 1)
    return grid.dequant(q, S, Z), r, S, Z


def lsq_grad_scale(bits: int, group_size: int, shape: tuple[int, int]) -> float:
    n = shape[0] * shape[1] if group_size == 0 else (shape[1] if group_size == -1 else group_size)
    return 1.0 / math.sqrt(n * (2 ** (bits - 1) - 1))


class L4QFunction(torch.autograd.Function):
    """y = x·Q(W₀ + scale·B·A)ᵀ with the L4Q backward. A and B may be None (full LSQ QAT on W₀)."""

    @staticmethod
    def forward(ctx, x, W0, A, B, s, b, scale: float, bits: int, group_size: int, g: float):
        with torch.no_grad():
            Wq = quantize_merged(merged(W0, A, B, scale), s, b, bits, group_size)[0]
            y = x @ Wq.to(x.dtype).T
        del Wq  # not saved: recomputed in backward
        ctx.save_for_backward(x, W0, A, B, s, b)
        ctx.cfg = (scale, bits, group_size, g)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, W0, A, B, s, b = ctx.saved_tensors
        scale, bits, group_size, g = ctx.cfg
        need_x, need_W0, need_A, need_B, need_s, need_b = ctx.needs_input_grad[:6]
        Wc = merged(W0, A, B, scale)
        Wq, r, S, Z = quantize_merged(Wc, s, b, bits, group_size)
        del Wc
        gx = gy @ Wq.to(gy.dtype) if need_x else None
        del Wq
        # G_W = Σ_tokens g_y xᵀ: formed here, used for every parameter, freed before returning.
        gW = gy.reshape(-1, gy.shape[-1]).T.to(r.dtype) @ x.reshape(-1, x.shape[-1]).to(r.dtype)
        v = r + Z  # position in code units before rounding: inside the grid iff 0 ≤ v ≤ 2^n − 1
        below, above = v < 0, v > 2**bits - 1
        del v
        inside = ~(below | above)
        gs = gb = None
        if need_s:
            qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            ds = torch.where(inside, torch.round(r) - r, torch.where(below, float(qn), float(qp)))
            gs = (g * grid.group_sum(gW * ds, group_size)).to(s.dtype)
            del ds
        if need_b:
            gb = (g * grid.group_sum(gW * (~inside), group_size)).to(b.dtype)
        del r, S, Z, below, above
        gW.mul_(inside)  # straight-through: only in-range weights pass the gradient to W_c
        del inside
        gA = (scale * (B.to(gW.dtype).T @ gW)).to(A.dtype) if need_A else None
        gB = (scale * (gW @ A.to(gW.dtype).T)).to(B.dtype) if need_B else None
        gW0 = gW.to(W0.dtype) if need_W0 else None
        del gW
        return gx, gW0, gA, gB, gs, gb, None, None, None, None


class L4QLinear(nn.Module):
    """A linear layer trained the L4Q way; `export()` gives its `QuantizedWeight` (UniformGrid).

    Trainable: A, B, s and (with `learn_offset`) b. Frozen: W₀ (a buffer) and the bias.
    `rank=0` with `train_weight=True` is full LSQ QAT: W₀ becomes the trained parameter.
    """

    def __init__(self, W0: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, b: torch.Tensor, *,
                 bits: int, group_size: int, rank: int, alpha: float, learn_offset: bool = True,
                 grad_scale: str = "lsq", base_dtype: torch.dtype | None = None, train_weight: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = W0.shape
        R, G = grid.check_grid((out_f, in_f), bits, group_size)
        self.bits, self.group_size, self.rank = bits, group_size, rank
        self.scale = alpha / rank if rank else 0.0
        self.learn_offset = learn_offset
        self.g = lsq_grad_scale(bits, group_size, (out_f, in_f)) if grad_scale == "lsq" else 1.0
        W0 = W0.detach().to(base_dtype or W0.dtype).clone()
        if train_weight:
            self.W0 = nn.Parameter(W0)
        else:
            self.register_buffer("W0", W0)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if rank:
            # LoRA init (paper §1.3): A Kaiming-uniform (nn.Linear's a = √5), B = 0, so W_c = W₀ at step 0.
            A = torch.empty(rank, in_f, dtype=torch.float32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32))
        else:
            self.A = self.B = None
        if tuple(s.shape) != (R, G) or tuple(b.shape) != (R, G):
            raise ValueError(f"step/offset shape {tuple(s.shape)}/{tuple(b.shape)}, {(R, G)} expected")
        self.s = nn.Parameter(s.detach().float().clone())
        self.b = nn.Parameter(b.detach().float().clone(), requires_grad=learn_offset)
        self.in_features, self.out_features = in_f, out_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = L4QFunction.apply(x, self.W0, self.A, self.B, self.s, self.b, self.scale, self.bits,
                              self.group_size, self.g)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return merged(self.W0, self.A, self.B, self.scale)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """W_q exactly as the training forward uses it (float32)."""
        return quantize_merged(self.merged_weight(), self.s, self.b, self.bits, self.group_size)[0]

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        Wc = self.merged_weight().float()
        s_q = grid.snap_scale(self.s.float())
        z = grid.offset_to_zero(self.b.float(), s_q, self.bits)
        # A frozen b = 0 keeps z = 2^(n−1): a symmetric grid whose zeros cost nothing.
        symmetric = not self.learn_offset and bool((z == 2 ** (self.bits - 1)).all())
        return grid.export_weight(Wc, s_q, z, self.bits, self.group_size, symmetric=symmetric, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, learn_offset={self.learn_offset}")
