"""LoRA beside a frozen weight: plain LoRA (16/32-bit base) and the QLoRA-style baseline (PTQ base).

    y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ,   A [r, in] Kaiming-uniform, B [out, r] = 0

The adapter stays *outside* the quantizer, so it cannot be merged into the integer grid without a new
rounding (that is the point L4Q makes). The QLoRA-style result is therefore exported as the PTQ
`QuantizedWeight` plus the adapter as its `LowRank` term, W ≈ Ŵ + (A'·B')ᵀ with A' = Aᵀ [in, r] and
B' = (α/r)·Bᵀ [r, out], stored in fp16 and counted in bits per weight (16·r·(in + out)/(in·out)), or,
with `factor_kind="int8"`, rounded after training to int8 with one fp16 scale per row of A' and of B'
(LowRank kind "int8", LQER's `quantize_factor`: 8·r·(in + out) + 16·(in + r) bits) — the cheaper adapter
that lets the baseline meet a given bits-per-weight budget.
In L4Q's tables "QLoRA*" is exactly this: GPTQ with uniform integers plus LoRA.

The quantized base is dequantized once into a float buffer (the pure-torch path of `QuantLinear`), so on
this CPU path QLoRA trains with LoRA's memory; a kernel that runs on packed codes would save the
difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.quantized_weight import LowRank, QuantizedWeight


class LoRALinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, rank: int, alpha: float,
                 base: QuantizedWeight | None = None, factor_dtype: torch.dtype = torch.float16,
                 factor_kind: str = "float", generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        if factor_kind not in ("float", "int8"):
            raise ValueError(f"unknown adapter storage {factor_kind!r}: float or int8")
        self.base, self.rank, self.scale, self.factor_dtype = base, rank, alpha / rank, factor_dtype
        self.factor_kind = factor_kind
        self.register_buffer("weight", weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        A = torch.empty(rank, in_f, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32))
        self.in_features, self.out_features = in_f, out_f

    @classmethod
    def on_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None, **kw) -> "LoRALinear":
        return cls(qweight.dequantize(), bias, base=qweight, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y + self.scale * F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.weight.float() + self.scale * (self.B @ self.A)

    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        """The PTQ base with the adapter as a fp16 (or int8) LowRank term (needs a quantized base)."""
        if self.base is None:
            raise ValueError("plain LoRA has no quantized base to export; use merged_weight()")
        A, B = self.A.T.contiguous(), (self.scale * self.B.T).contiguous()
        if self.factor_kind == "int8":
            from lowbit.methods.lqer import quantize_factor

            (qA, sA), (qB, sB) = quantize_factor(A, "int8"), quantize_factor(B, "int8")
            lr = LowRank(qA, qB, "int8", sA, sB)
        else:
            lr = LowRank(A.to(self.factor_dtype), B.to(self.factor_dtype))
        b = self.base
        qw = QuantizedWeight(b.shape, dtype, b.grid, b.codes, b.outliers, lr)
        qw.check()
        return qw

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"base={'quantized' if self.base is not None else 'float'}")
